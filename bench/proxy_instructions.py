"""Instructions meter executes per proxied request, counted by callgrind: a figure that does not move
with the machine's speed, for comparing a change to meter's forward path before and after.

``meter serve`` (SQLite, everything on, as in ``bench.run``) runs under ``valgrind --tool=callgrind``,
the simulator natively; one client sends ``--small`` and then, in a second run, ``--large`` sequential
requests of one kind, and the difference of the two totals divided by ``large - small`` is what one
request costs (start-up and shutdown cancel out). Time-driven background work (the writer's ticker,
the key directory's poll) runs for longer in the larger run and is counted with it: a few percent.

    .venv/bin/python -m bench.proxy_instructions                    # chat, not streamed
    .venv/bin/python -m bench.proxy_instructions --stream           # chat, streamed (20 chunks)
    .venv/bin/python -m bench.proxy_instructions --small 100 --large 1100
    .venv/bin/python -m bench.proxy_instructions --baseline         # and the bare pass-through

``--baseline`` counts :mod:`bench.passthrough` (meter's stack, nothing observed or recorded) the same
way, and prints the difference: the instructions meter's own work adds to each request, a figure that
neither the machine's speed nor hypervisor steal moves.

Takes a few minutes (everything in meter runs ~50 times slower under callgrind).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs

MODEL = "accounts/fireworks/models/llama-v3p1-8b-instruct"
REPO = Path(__file__).resolve().parent.parent  # where ``python -m bench.passthrough`` is found


def wait_listening(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url} exited with {process.returncode} before it answered")
        try:
            httpx.get(f"{url}/healthz", timeout=2)  # any answer: the simulator has no /healthz
            return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def count(workdir: Path, upstream: str, requests: int, stream: bool, *, passthrough: bool = False) -> int:
    """Instructions of one ``meter serve`` run (or, ``passthrough``, one :mod:`bench.passthrough`
    run) that proxied ``requests`` requests."""
    run = workdir / f"{'passthrough' if passthrough else 'meter'}-{requests}"
    run.mkdir()
    port = procs.free_port()
    env = dict(
        os.environ,
        METER_KEY_SECRET="bench-instructions-secret",
        METER_JOURNAL_DIR=str(run / "journal"),
        METER_LOG_LEVEL="warning",
    )
    if passthrough:
        server = ["bench.passthrough", "--port", str(port), "--upstream", upstream]
    else:
        server = ["meter", "serve", "--port", str(port), "--upstream", upstream]
        server += ["--database", f"sqlite:///{run / 'meter.db'}"]
    log = (run / "valgrind.log").open("w")
    meter = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={run / 'callgrind.out'}",
            sys.executable,
            "-m",
            *server,
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_listening(url, meter, timeout=600)
        body: dict[str, object] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 16,
            "stream": stream,
        }
        headers = {"authorization": "Bearer fw_bench_instructions_key"}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            for _ in range(requests):
                response = client.post("/v1/chat/completions", json=body)
                if response.status_code != 200:
                    raise SystemExit(f"meter answered {response.status_code}: {response.text[:300]}")
    finally:
        meter.send_signal(signal.SIGTERM)
        meter.wait(600)
        log.close()
    found = re.findall(r"Collected : (\d+)", (run / "valgrind.log").read_text())
    if not found:
        raise SystemExit(f"no callgrind total in {run / 'valgrind.log'}")
    return int(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=100, help="requests in the first run (default 100)")
    parser.add_argument("--large", type=int, default=600, help="requests in the second run (default 600)")
    parser.add_argument("--stream", action="store_true", help="streamed chat completions")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also count the bare pass-through (bench.passthrough) and print meter minus it",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    if args.large <= args.small:
        raise SystemExit("--large must exceed --small")
    with tempfile.TemporaryDirectory(prefix="meter-instructions-") as tmp:
        workdir = Path(tmp)
        sim_port = procs.free_port()
        simulator = subprocess.Popen(
            [sys.executable, "-m", "meter", "simulate", "--port", str(sim_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        upstream = f"http://127.0.0.1:{sim_port}"
        try:
            wait_listening(upstream, simulator, timeout=60)
            small = count(workdir, upstream, args.small, args.stream)
            large = count(workdir, upstream, args.large, args.stream)
            if args.baseline:
                base_small = count(workdir, upstream, args.small, args.stream, passthrough=True)
                base_large = count(workdir, upstream, args.large, args.stream, passthrough=True)
        finally:
            simulator.terminate()
            simulator.wait(30)
    runs = args.large - args.small
    per_request = (large - small) / runs
    kind = "streamed (20 chunks)" if args.stream else "non-streamed"
    print(f"meter serve under callgrind, chat completions, {kind}")
    print(f"  {args.small:>6} requests: {small:>15,} instructions")
    print(f"  {args.large:>6} requests: {large:>15,} instructions")
    print(f"  per request: {per_request:,.0f} instructions")
    if args.baseline:
        base = (base_large - base_small) / runs
        print("bench.passthrough under callgrind, the same requests")
        print(f"  {args.small:>6} requests: {base_small:>15,} instructions")
        print(f"  {args.large:>6} requests: {base_large:>15,} instructions")
        print(f"  per request: {base:,.0f} instructions")
        print(
            f"meter's own work: {per_request - base:,.0f} instructions per request "
            f"({per_request / base:.2f}x the pass-through)"
        )


if __name__ == "__main__":
    main()
