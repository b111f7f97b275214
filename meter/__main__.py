from meter.cli.main import main

main()
