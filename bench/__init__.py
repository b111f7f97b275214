"""meter's rerunnable benchmark: the same load sent directly to the simulator and through meter.

Run it with ``python -m bench.run`` (``--help`` lists the flags, ``--quick`` is a few-second smoke run).

Layout, in the order a run meets it:

- :mod:`.run`      command line and orchestration: which targets, which steps, rounds, in which order
- :mod:`.targets`  the simulator and the meter processes under test; meter's writer backlog and records
- :mod:`.passthrough`  ``--baseline``: a bare proxy on meter's stack, nothing observed (the floor)
- :mod:`.procs`    processes in general: ports, CPU pinning, readiness, RSS and CPU time from /proc
- :mod:`.loadgen`  the Python load generator process (aiohttp + uvloop): open loop and closed loop
- :mod:`.wrk`      the closed-loop generator of choice when ``wrk`` is installed (Lua script for the POST)
- :mod:`.stats`    percentiles, and merging a step's rounds
- :mod:`.compare`  what meter adds over direct (and over the pass-through), the targets (PASS/MISS),
                   server and client verdicts
- :mod:`.report`   the plain-text report

Rule 1: open-loop latency is measured from each request's *scheduled* start, so a stalled server is
        charged for every request it delayed (no coordinated omission).
Rule 2: direct and through-meter runs alternate step by step against the same simulator, so drift
        over the run (caches, a busy neighbour) lands on both sides.
Rule 3: every number says which generator produced it.
"""
