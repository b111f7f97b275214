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
    .venv/bin/python -m bench.proxy_instructions --quota            # and meter with limits (Redis)

``--baseline`` counts :mod:`bench.passthrough` (meter's stack, nothing observed or recorded) the same
way, and prints the difference: the instructions meter's own work adds to each request, a figure that
neither the machine's speed nor hypervisor steal moves. ``--quota`` counts meter with every kind of
limit on the key and its team (``bench.run --quota``'s setup; a ``redis-server`` the tool starts,
outside callgrind) and prints what quota admission adds to each request.

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
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs
from bench.targets import ADMIN_TOKEN, Target, set_limits, start_redis

MODEL = "accounts/fireworks/models/llama-v3p1-8b-instruct"
KEY = "fw_bench_instructions_key"
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


def count(
    workdir: Path,
    upstream: str,
    requests: int,
    stream: bool,
    *,
    passthrough: bool = False,
    quota_redis: str | None = None,
) -> int:
    """Instructions of one ``meter serve`` run (or, ``passthrough``, one :mod:`bench.passthrough`
    run) that proxied ``requests`` requests. ``quota_redis``: the bench key and its team get every
    kind of limit (as ``bench.run --quota``), counters in that Redis."""
    variant = "passthrough" if passthrough else "quota" if quota_redis else "meter"
    run = workdir / f"{variant}-{requests}"
    run.mkdir()
    port = procs.free_port()
    env = dict(
        os.environ,
        METER_KEY_SECRET="bench-instructions-secret",
        METER_JOURNAL_DIR=str(run / "journal"),
        METER_LOG_LEVEL="warning",
    )
    if quota_redis is not None:
        env.update(
            METER_REDIS_URL=quota_redis,
            METER_QUOTA_PREFIX=f"meter-instructions:{os.getpid()}:{requests}:",
            METER_ADMIN_TOKEN=ADMIN_TOKEN,
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
        if quota_redis is not None:
            set_limits(Target("meter", "meter", url), KEY)
        body: dict[str, object] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 16,
            "stream": stream,
        }
        headers = {"authorization": f"Bearer {KEY}"}
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
    parser.add_argument(
        "--quota",
        action="store_true",
        help="also count meter with every kind of limit on the key and its team (a redis-server the "
        "tool starts) and print what admission adds",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    if args.large <= args.small:
        raise SystemExit("--large must exceed --small")
    variants: list[tuple[str, dict[str, Any]]] = [("meter serve", {})]
    if args.baseline:
        variants.append(("bench.passthrough", {"passthrough": True}))
    per_request: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="meter-instructions-") as tmp:
        workdir = Path(tmp)
        sim_port = procs.free_port()
        simulator = subprocess.Popen(
            [sys.executable, "-m", "meter", "simulate", "--port", str(sim_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        upstream = f"http://127.0.0.1:{sim_port}"
        with procs.stopping([]) as helpers:
            if args.quota:
                redis, redis_url = start_redis(workdir, procs.Pinning(None, None))
                helpers.append(redis)
                variants.append(("meter serve with limits", {"quota_redis": redis_url}))
            try:
                wait_listening(upstream, simulator, timeout=60)
                kind = "streamed (20 chunks)" if args.stream else "non-streamed"
                for name, options in variants:
                    small = count(workdir, upstream, args.small, args.stream, **options)
                    large = count(workdir, upstream, args.large, args.stream, **options)
                    per_request[name] = (large - small) / (args.large - args.small)
                    print(f"{name} under callgrind, chat completions, {kind}")
                    print(f"  {args.small:>6} requests: {small:>15,} instructions")
                    print(f"  {args.large:>6} requests: {large:>15,} instructions")
                    print(f"  per request: {per_request[name]:,.0f} instructions", flush=True)
            finally:
                simulator.terminate()
                simulator.wait(30)
    meter = per_request["meter serve"]
    if args.baseline:
        base = per_request["bench.passthrough"]
        print(
            f"meter's own work: {meter - base:,.0f} instructions per request "
            f"({meter / base:.2f}x the pass-through)"
        )
    if args.quota:
        print(
            f"quota admission: {per_request['meter serve with limits'] - meter:,.0f} instructions per request"
        )


if __name__ == "__main__":
    main()
