"""``python -m bench.run``: start the simulator and meter, send the same load to both, print the report.

Targets: ``direct`` (the simulator itself) and one ``meter[server,client]`` per combination of
``--server`` and ``--client`` (``all`` = every choice), each its own ``meter serve`` process with its own
SQLite file, all forwarding to one simulator. With ``--baseline``, also ``pass-through``: a bare proxy
on meter's stack (:mod:`bench.passthrough`: raw ASGI on uvicorn, the aiohttp client, nothing observed
or recorded) on meter's core, so the report can show what meter's own work costs per request. Steps:

1. open loop, non-streaming, at each ``--rates`` value: latency percentiles from scheduled start;
2. open loop, streaming, at each ``--stream-rates`` value: time to first token and whole-stream time;
3. closed loop, non-streaming, then streaming: maximum throughput at ``--connections``.

Each step runs in ``--rounds`` rounds; within a round every target takes its turn, so direct and meter
alternate (rule 2 of :mod:`bench`). Open-loop rounds are pooled sample by sample, closed-loop rounds
give the median. The bench measures the CPU time of its own processes and of the whole machine; a round
during which other processes took more than a quarter of a core is run again (``--retry-noisy``), and
what remains is shown in the report's "other cpu" column and warnings.

Before a meter round the bench waits for meter's writer to have no records pending, so a round does
not pay for the previous one's database backlog, and resets meter's peak RSS (``clear_refs``) so each
step reports its own peak (the pass-through's too; it has no writer). After the last step it stops each
meter (flushing the writer) and counts the records in its SQLite file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import compare, procs, report, stats, wrk
from bench.targets import (
    Target,
    count_records,
    export_source,
    rss_summary,
    set_limits,
    start_meter,
    start_passthrough,
    start_redis,
    start_simulator,
    wait_writer_idle,
)

SERVERS = ("uvicorn",)
CLIENTS = ("aiohttp", "httpx")
MODEL = "accounts/fireworks/models/llama-v3p1-8b-instruct"
STREAM_CHUNKS = 20  # max_tokens: the simulator sends one content chunk per token
KEY = "sk-bench-00000000000000000000000000000001"
PATH = "/v1/chat/completions"
REPO = Path(__file__).resolve().parent.parent
NOISY_ROUND_PCT = 25.0  # CPU share of one core used by other processes above which a round is re-run


def request_body(stream: bool) -> str:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say something short about benchmarks."}],
            "max_tokens": STREAM_CHUNKS,
            "stream": stream,
        },
        separators=(",", ":"),
    )


@dataclass(frozen=True)
class Options:
    servers: tuple[str, ...]
    clients: tuple[str, ...]
    duration: float
    rounds: int
    warmup: float
    rates: tuple[int, ...]
    stream_rates: tuple[int, ...]
    connections: int
    closed_generator: str  # "wrk" or "python"
    pin: str
    timeout: float
    retry_noisy: int
    json_path: Path | None
    workdir: Path | None
    quota_redis: str | None
    baseline: bool
    quick: bool
    meter_env: dict[str, str] = field(default_factory=dict)
    quota_variant: dict[str, str] = field(default_factory=dict)  # a second quota target's own settings
    variant: dict[str, str] = field(default_factory=dict)  # a second meter's own settings (no limits)
    compare_source: str | None = None  # a git ref: also measure meter as it is there


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--server",
        choices=[*SERVERS, "all"],
        default=None,
        help="meter's ASGI server (uvicorn, the only one)",
    )
    parser.add_argument(
        "--client",
        choices=[*CLIENTS, "all"],
        default=None,
        help="meter's forward client, METER_UPSTREAM_CLIENT (default: aiohttp)",
    )
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per step (default 3)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="split each step into this many rounds alternating between targets (default 3)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="unmeasured seconds before each open-loop round (default 0.3)",
    )
    parser.add_argument(
        "--rates", default=None, help="open-loop non-streaming req/s, comma-separated (default 500,1000,1500)"
    )
    parser.add_argument("--stream-rates", default=None, help="open-loop streams/s (default 500)")
    parser.add_argument("--connections", type=int, default=None, help="closed-loop connections (default 64)")
    parser.add_argument(
        "--closed-generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="closed-loop generator: wrk when installed (auto), else the Python one",
    )
    parser.add_argument(
        "--pin",
        choices=["auto", "none"],
        default="auto",
        help="auto: meter on the last CPU, simulator + generators on the others",
    )
    parser.add_argument(
        "--retry-noisy",
        type=int,
        default=None,
        help=f"re-run a round during which other processes used > {NOISY_ROUND_PCT:g}%% of a core, at most "
        "this many times per step and target (default 2, --quick 0; 0 keeps every round)",
    )
    parser.add_argument(
        "--quota",
        nargs="?",
        const="redis://127.0.0.1:6379/0",
        default=None,
        metavar="REDIS_URL",
        help="also measure meter with quota limits on (counters in this Redis, default "
        "redis://127.0.0.1:6379/0; 'local': a redis-server the bench starts, pinned with the simulator "
        "so it does not share meter's core) beside the same meter with none, and report what admission adds",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also measure a bare pass-through on meter's stack and core (python -m bench.passthrough), "
        "and report meter against it: throughput ratio and meter's own CPU per request",
    )
    parser.add_argument(
        "--meter-env",
        action="append",
        default=[],
        metavar="METER_NAME=VALUE",
        help="a setting for every meter the bench starts (repeatable), e.g. METER_WRITER_BATCH_SIZE=200; "
        "without it they run on meter's defaults",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="METER_NAME=VALUE",
        help="also measure a second meter (the first --server and --client) that has these settings too "
        "(repeatable; one more target), e.g. METER_WRITER_FLUSH_INTERVAL=0.25, to compare a setting "
        "side by side in one run",
    )
    parser.add_argument(
        "--quota-variant",
        action="append",
        default=[],
        metavar="METER_NAME=VALUE",
        help="with --quota: also measure a second meter with limits that has these settings too "
        "(repeatable; one more target), e.g. METER_QUOTA_SETTLE_LINGER=0, to compare a quota setting "
        "side by side in one run",
    )
    parser.add_argument(
        "--compare-source",
        default=None,
        metavar="GIT_REF",
        help="also measure meter as it is at this git ref (its meter/ and migrations/, run by the same "
        "Python; one more target, e.g. --compare-source HEAD~3), to compare two versions side by side "
        "in one run",
    )
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run (tests use it)")
    parser.add_argument("--json", dest="json_path", type=Path, default=None, help="also save results here")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the processes' logs and meter's SQLite files here (default: a temporary directory)",
    )
    args = parser.parse_args(argv)

    quick = args.quick

    def pick(value: Any, default: Any, quick_default: Any) -> Any:
        return value if value is not None else (quick_default if quick else default)

    server = pick(args.server, "all", "uvicorn")
    client = pick(args.client, "aiohttp", "aiohttp")
    duration = pick(args.duration, 3.0, 0.5)
    rounds = pick(args.rounds, 3, 1)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    closed = args.closed_generator
    has_wrk = wrk.available() is not None
    if closed == "wrk" and not has_wrk:
        parser.error("--closed-generator wrk: wrk is not installed (apt-get install wrk)")
    if closed == "auto":
        # wrk runs whole seconds; a sub-second round stays with the Python generator
        closed = "wrk" if has_wrk and duration / rounds >= 1 else "python"
    try:
        rates = tuple(int(r) for r in pick(args.rates, "500,1000,1500", "200").split(","))
        stream_rates = tuple(int(r) for r in pick(args.stream_rates, "500", "100").split(","))
    except ValueError:
        parser.error("--rates and --stream-rates take comma-separated integers")
    if any(r <= 0 for r in (*rates, *stream_rates)) or duration <= 0:
        parser.error("rates and --duration must be positive")

    def settings(items: list[str], flag: str) -> dict[str, str]:
        out = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name.startswith("METER_"):
                parser.error(f"{flag} takes METER_NAME=VALUE, got {item!r}")
            out[name] = value
        return out

    meter_env = settings(args.meter_env, "--meter-env")
    quota_variant = settings(args.quota_variant, "--quota-variant")
    variant = settings(args.variant, "--variant")
    if quota_variant and args.quota is None:
        parser.error("--quota-variant needs --quota")
    return Options(
        servers=SERVERS if server == "all" else (server,),
        clients=CLIENTS if client == "all" else (client,),
        duration=duration,
        rounds=rounds,
        warmup=pick(args.warmup, 0.3, 0.2),
        rates=rates,
        stream_rates=stream_rates,
        connections=pick(args.connections, 64, 16),
        closed_generator=closed,
        pin=args.pin,
        timeout=pick(None, 10.0, 5.0),
        retry_noisy=pick(args.retry_noisy, 2, 0),
        json_path=args.json_path,
        workdir=args.workdir,
        quota_redis=args.quota,
        baseline=args.baseline,
        quick=quick,
        meter_env=meter_env,
        quota_variant=quota_variant,
        variant=variant,
        compare_source=args.compare_source,
    )


def _share_pct(result: dict[str, Any], key: str) -> float:
    """``result[key]`` CPU seconds as a share of one core over the round."""
    elapsed = result.get("elapsed_s") or 0.0
    return result.get(key, 0.0) / elapsed * 100 if elapsed else 0.0


# steps --------------------------------------------------------------------------------------------


class Bench:
    """Runs every step on every target, in rounds that alternate between the targets."""

    def __init__(
        self,
        options: Options,
        sim: procs.Process,
        sim_url: str,
        targets: list[Target],
        loadgen: procs.LoadGenerator,
        pinning: procs.Pinning,
        log: Any,
        helpers: list[procs.Process] | None = None,
    ) -> None:
        self.o = options
        self.helpers = helpers or []
        self.sim = sim
        self.sim_url = sim_url
        self.targets = targets
        self.loadgen = loadgen
        self.pinning = pinning
        self.log = log

    def _sim_requests(self) -> int:
        stats = procs.get_json(f"{self.sim_url}/_sim/stats")
        return int(stats["requests"])

    def _round(self, target: Target, run: Any) -> dict[str, Any]:
        """One round on ``target``, with the CPU time the proxy under test (meter or the pass-through) and
        the simulator used, and the proxy's peak RSS."""
        if target.kind == "meter":
            wait_writer_idle(target)
        if target.process is not None:
            procs.reset_peak_rss(target.process)
        sim_requests = self._sim_requests()
        meter_cpu0 = target.process.cpu_seconds() if target.process else 0.0
        sim_cpu0 = self.sim.cpu_seconds()
        ours0, (busy0, steal0) = self._ours(), procs.machine_busy_seconds()
        t0 = time.perf_counter()
        result: dict[str, Any] = run()
        result["elapsed_s"] = time.perf_counter() - t0
        result["sim_cpu_s"] = self.sim.cpu_seconds() - sim_cpu0
        busy, steal = procs.machine_busy_seconds()
        result["other_cpu_s"] = max(0.0, (busy - busy0) - (self._ours() - ours0))
        result["steal_cpu_s"] = steal - steal0  # a part of other_cpu_s: the hypervisor's
        if target.process is not None:
            result["meter_cpu_s"] = target.process.cpu_seconds() - meter_cpu0
            peak = procs.peak_rss(target.process)
            result["rss_mb"], result["rss_total_mb"] = peak["serving_mb"], peak["total_mb"]
            result["processes"] = peak["processes"]
        target.sim_requests += self._sim_requests() - sim_requests
        return result

    def _ours(self) -> float:
        """CPU time of every process the bench runs (to tell other load on the machine apart)."""
        meters = sum(t.process.cpu_seconds() for t in self.targets if t.process is not None)
        helpers = sum(h.cpu_seconds() for h in self.helpers)
        return self.sim.cpu_seconds() + meters + helpers + self.loadgen.cpu_seconds() + procs.own_seconds()

    def _job(self, target: Target, **job: Any) -> dict[str, Any]:
        job.update(url=target.url + PATH, body=request_body(job["stream"]), key=KEY, timeout=self.o.timeout)
        return self.loadgen.run(job)

    def _step(self, key: str, label: str, closed: bool, make_run: Any) -> None:
        """Run one step in ``rounds`` rounds, targets alternating, and store the merged result."""
        rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in self.targets}
        retried = {t.name: 0 for t in self.targets}
        for number in range(self.o.rounds):
            for target in self.targets:
                self.log(f"{label} -> {target.name} (round {number + 1}/{self.o.rounds})")
                result = self._round(target, make_run(target))
                # A round during which other processes took a good share of the CPU measures them
                # too: run it again (a bounded number of times) rather than keep it.
                while (
                    _share_pct(result, "other_cpu_s") > NOISY_ROUND_PCT
                    and retried[target.name] < self.o.retry_noisy
                ):
                    retried[target.name] += 1
                    self.log(
                        f"  other processes used {_share_pct(result, 'other_cpu_s'):.0f}% of a core "
                        f"({_share_pct(result, 'steal_cpu_s'):.0f}% hypervisor steal): round again"
                    )
                    time.sleep(1.0)
                    result = self._round(target, make_run(target))
                rounds[target.name].append(result)
        for target in self.targets:
            done = rounds[target.name]
            merged = stats.merge_closed(done) if closed else stats.merge_open(done)
            merged["noisy_rounds_rerun"] = retried[target.name]
            elapsed = sum(r["elapsed_s"] for r in done)
            merged["cpu_pct"] = {
                "simulator": round(sum(r["sim_cpu_s"] for r in done) / elapsed * 100, 1),
                "other": round(sum(r["other_cpu_s"] for r in done) / elapsed * 100, 1),
                "steal": round(sum(r.get("steal_cpu_s", 0.0) for r in done) / elapsed * 100, 1),
            }
            if target.process is not None:
                merged["cpu_pct"]["meter"] = round(sum(r["meter_cpu_s"] for r in done) / elapsed * 100, 1)
                answered = sum(r.get("ok") or 0 for r in done)
                if closed and answered:
                    # CPU time per answered request: unlike 1/max, steal and an unsaturated core
                    # do not move it (a closed-loop round is load from start to end, no warm-up)
                    merged["cpu_us_per_request"] = round(
                        sum(r["meter_cpu_s"] for r in done) / answered * 1e6, 1
                    )
                merged["rss_mb"] = max(r["rss_mb"] for r in done)
                merged["rss_total_mb"] = max(r["rss_total_mb"] for r in done)
                merged["processes"] = max(r["processes"] for r in done)
            path = key.split(".")
            slot = target.results
            for part in path[:-1]:
                slot = slot.setdefault(part, {})
            slot[path[-1]] = merged

    def run(self) -> None:
        o = self.o
        for target in self.targets:
            self.log(f"warming up {target.name}")
            for stream in (False, True):
                self._round(
                    target,
                    lambda t=target, s=stream: self._job(
                        t, mode="closed", stream=s, connections=8, duration=max(0.2, o.warmup), warmup=0.0
                    ),
                )
            if target.process is not None:
                target.results["idle_rss_mb"] = procs.current_rss_mb(target.process)
        per_round = o.duration / o.rounds
        for rate in o.rates:
            self._step(
                f"latency.{rate}",
                f"open loop {rate} req/s",
                False,
                lambda t, r=rate: (
                    lambda: self._job(
                        t, mode="open", stream=False, rate=r, duration=per_round, warmup=o.warmup, raw=True
                    )
                ),
            )
        for rate in o.stream_rates:
            self._step(
                f"stream.{rate}",
                f"open loop {rate} streams/s",
                False,
                lambda t, r=rate: (
                    lambda: self._job(
                        t, mode="open", stream=True, rate=r, duration=per_round, warmup=o.warmup, raw=True
                    )
                ),
            )
        for stream, key in ((False, "max_requests"), (True, "max_streams")):
            label = f"closed loop {'streams' if stream else 'requests'}"
            if o.closed_generator == "wrk":
                self._step(
                    key,
                    label,
                    True,
                    lambda t, s=stream: (
                        lambda: wrk.run(
                            t.url + PATH,
                            request_body(s),
                            KEY,
                            connections=o.connections,
                            duration=per_round,
                            cpus=self.pinning.load,
                        )
                    ),
                )
            else:
                self._step(
                    key,
                    label,
                    True,
                    lambda t, s=stream: (
                        lambda: self._job(
                            t,
                            mode="closed",
                            stream=s,
                            connections=o.connections,
                            duration=per_round,
                            warmup=o.warmup,
                        )
                    ),
                )


def _source_state() -> str:
    """The commit meter was measured at, and whether the tree had local changes (read-only git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "meter"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if not head:
        return "unknown"
    return f"{head}" + (f" + {len(changed)} changed files under meter/" if changed else "")


def _versions() -> dict[str, str]:
    out = {}
    for package in ("meter", "aiohttp", "httpx", "uvicorn", "uvloop", "litestar"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "-"
    return out


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    started = time.perf_counter()
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    pinning = procs.choose_pinning(options.pin)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    wrk_version = wrk.available()
    with contextlib.ExitStack() as stack:
        if options.workdir is not None:
            workdir = options.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meter-bench-")))
        processes: list[procs.Process] = []
        helpers: list[procs.Process] = []  # the bench's own services besides the simulator (Redis)
        quota_desc: str | None = None
        loadgen: procs.LoadGenerator | None = None
        with procs.stopping(processes):
            log("starting the simulator")
            sim, sim_url = start_simulator(workdir, pinning)
            processes.append(sim)
            targets = [Target("direct", "direct", sim_url)]
            if options.baseline:
                target = start_passthrough(workdir, pinning, sim_url)
                assert target.process is not None
                processes.append(target.process)
                targets.append(target)
                log(f"{target.name} ready on {target.url} (pid {target.process.pid})")
            for server in options.servers:
                for client in options.clients:
                    target = start_meter(
                        workdir, pinning, sim_url, server, client, meter_env=options.meter_env
                    )
                    assert target.process is not None
                    processes.append(target.process)
                    targets.append(target)
            if options.variant:
                target = start_meter(
                    workdir,
                    pinning,
                    sim_url,
                    options.servers[0],
                    options.clients[0],
                    meter_env=options.meter_env,
                    variant=options.variant,
                )
                assert target.process is not None
                processes.append(target.process)
                targets.append(target)
            if options.compare_source:
                source = (options.compare_source, export_source(options.compare_source, workdir))
                target = start_meter(
                    workdir,
                    pinning,
                    sim_url,
                    options.servers[0],
                    options.clients[0],
                    meter_env=options.meter_env,
                    source=source,
                )
                assert target.process is not None
                processes.append(target.process)
                targets.append(target)
            quota_redis = options.quota_redis
            if quota_redis == "local":
                redis, quota_redis = start_redis(workdir, pinning)
                processes.append(redis)
                helpers.append(redis)
                log(f"redis-server on {quota_redis} (pid {redis.pid})")
                quota_desc = f"a redis-server the bench started, pinned to cpu {sorted(pinning.load or ())}"
            elif quota_redis is not None:
                quota_desc = f"{quota_redis} (the machine's Redis, not pinned: its CPU shows as 'other')"
            if quota_redis is not None:
                server, client = options.servers[0], options.clients[0]
                variants: list[dict[str, str]] = [{}] + (
                    [options.quota_variant] if options.quota_variant else []
                )
                for variant in variants:
                    target = start_meter(
                        workdir,
                        pinning,
                        sim_url,
                        server,
                        client,
                        redis_url=quota_redis,
                        meter_env=options.meter_env,
                        variant=variant,
                    )
                    assert target.process is not None
                    processes.append(target.process)
                    targets.append(target)
            meters = [t for t in targets if t.kind == "meter"]
            for target in meters:
                assert target.process is not None
                procs.wait_http(f"{target.url}/readyz", target.process, timeout=60)
                if target.quota:
                    set_limits(target, KEY)
                log(f"{target.name} ready on {target.url} (pid {target.process.pid})")
            loadgen = procs.LoadGenerator(pinning.load, REPO)
            try:
                Bench(options, sim, sim_url, targets, loadgen, pinning, log, helpers).run()
            finally:
                loadgen.close()
            for target in targets:
                if target.process is not None:
                    target.results["rss"] = rss_summary(target.results)
            for target in meters:
                assert target.process is not None and target.db_path is not None
                target.process.stop()
                target.results["records_written"] = count_records(target.db_path)

    closed_generator = (
        f"{wrk_version}, 1 thread, {options.connections} connections"
        if options.closed_generator == "wrk"
        else f"Python aiohttp+uvloop generator, {options.connections} connections"
        + ("" if wrk_version else " (wrk not installed)")
    )
    results: dict[str, Any] = {
        "meta": {
            "started_at": started_at,
            "elapsed_s": round(time.perf_counter() - started, 1),
            "command": "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "cpus": os.cpu_count(),
            "pinning": pinning.description,
            "simulator": f"meter simulate (uvicorn + uvloop + httptools), chat completions, "
            f"max_tokens={STREAM_CHUNKS}, no delays",
            "stream_chunks": STREAM_CHUNKS,
            "duration_s": options.duration,
            "rounds": options.rounds,
            "warmup_s": options.warmup,
            "rates": list(options.rates),
            "stream_rates": list(options.stream_rates),
            "connections": options.connections,
            "baseline": "bench.passthrough: raw ASGI on uvicorn (uvloop + httptools) with one aiohttp "
            "session, nothing observed or recorded, pinned like meter"
            if options.baseline
            else None,
            "quota_redis": quota_desc,
            "meter_env": options.meter_env,
            "quota_variant": options.quota_variant,
            "variant": options.variant,
            "compare_source": options.compare_source,
            "open_generator": "Python aiohttp+uvloop generator (separate process)",
            "closed_generator": closed_generator,
            "versions": _versions(),
            "python": sys.version.split()[0],
            "source": _source_state(),
        },
        "targets": [
            {
                "name": t.name,
                "kind": t.kind,
                "server": t.server,
                "client": t.client,
                "quota": t.quota,
                "variant": t.variant,
                **t.results,
                "requests_seen": t.sim_requests,
            }
            for t in targets
        ],
    }
    compare.analyse(results)
    results["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(report.render(results), end="")
    if options.json_path is not None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(results, indent=2) + "\n")
        log(f"results saved to {options.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
