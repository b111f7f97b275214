"""Quota admission micro-benchmark: what ``Admission.admit`` and ``Admission.settle`` cost per request.

Each request is checked against a team policy (USD budget, token budget, rpm, tpm, concurrency) and a
key policy (USD budget, rpm) — the most expensive case: two subjects, every kind of limit — spread
over ``--keys`` keys of one team, with limits high enough that nothing is refused. Measured per call
with ``perf_counter_ns``: ``admit`` (estimate + one store round trip + metrics), ``settle`` (started
as the forward path starts it, not awaited by the next request: from its start until it is applied,
which for Redis includes waiting up to the store's linger for the next reserve to travel with), plus
the no-policy path for reference; and the process's CPU per admit + settle.

Modes: ``sequential`` (one request at a time: the added latency without load; with Redis each admit
carries the previous request's settle, as back-to-back requests do in the proxy) and ``concurrent``
(``-c`` tasks in one event loop, as a busy proxy would run them: latency then includes waiting for the
loop).

    .venv/bin/python bench/quota_admission.py                  # memory and redis, both modes
    .venv/bin/python bench/quota_admission.py --store redis -n 50000 -c 64
    METER_BENCH_REDIS_URL=redis://host:6379/0 .venv/bin/python bench/quota_admission.py

Redis is the machine's server at 127.0.0.1:6379 unless ``METER_BENCH_REDIS_URL`` names another; keys
go under a fresh ``meter-bench:<hex>:`` prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meter.quota.admission import Admission, AdmissionConfig
from meter.quota.memory import MemoryStore
from meter.quota.policy import Limits
from meter.quota.redis_store import RedisStore, connect
from meter.quota.store import QuotaStore
from meter.records import Usage
from meter.tap.request import inspect_request

TEAM_LIMITS = Limits(
    budget_usd=Decimal("1000000"),
    tokens_budget=10**12,
    rpm=10**9,
    tpm=10**12,
    max_concurrent=10**6,
)
KEY_LIMITS = Limits(budget_usd=Decimal("100000"), rpm=10**9)
BODY = orjson.dumps(
    {
        "model": "accounts/fireworks/models/llama-v3p1-8b-instruct",
        "messages": [{"role": "user", "content": "Say hello " * 40}],
        "max_tokens": 256,
    }
)


@dataclass(frozen=True)
class Price:
    input: Decimal = Decimal("0.2")
    cached_input: Decimal | None = None
    output: Decimal = Decimal("0.2")


def percentile(sorted_ns: list[int], q: float) -> float:
    index = min(int(q * len(sorted_ns)), len(sorted_ns) - 1)
    return sorted_ns[index] / 1000.0


def summary(name: str, samples: list[int]) -> str:
    s = sorted(samples)
    return (
        f"  {name:<14} p50 {percentile(s, 0.50):7.1f} µs   p99 {percentile(s, 0.99):7.1f} µs   "
        f"p99.9 {percentile(s, 0.999):7.1f} µs   max {s[-1] / 1000:8.1f} µs"
    )


async def run(store: QuotaStore, n: int, concurrency: int, keys: int) -> list[str]:
    def lookup(team: str, key_fp: str | None) -> tuple[Limits | None, Limits | None]:
        if team == "bench":
            return TEAM_LIMITS, KEY_LIMITS
        return None, None

    admission = Admission(
        store, lookup, lambda model: Price(), registry=CollectorRegistry(), config=AdmissionConfig()
    )
    info = inspect_request(BODY)
    usage = Usage(prompt_tokens=110, completion_tokens=200)
    fingerprints = [secrets.token_hex(32) for _ in range(keys)]
    admit_ns: list[int] = []
    settle_ns: list[int] = []
    unlimited_ns: list[int] = []
    settling: set[asyncio.Future[object]] = set()
    clock = time.perf_counter_ns

    def settled(started: int) -> Callable[[asyncio.Future[object]], None]:
        def done(task: asyncio.Future[object]) -> None:
            settle_ns.append(clock() - started)
            settling.discard(task)

        return done

    async def one(i: int) -> None:
        fp = fingerprints[i % keys]
        t0 = clock()
        result = await admission.admit("bench", fp, info, datetime.now(UTC))
        t1 = clock()
        assert result.allowed and result.reservation is not None, result.rejection
        admit_ns.append(t1 - t0)
        # As the forward path does: started, and not awaited before the next request's admit.
        task = admission.start_settle(result.reservation, usage, None, datetime.now(UTC))
        settling.add(task)
        task.add_done_callback(settled(clock()))
        t4 = clock()
        await admission.admit("nobody", fp, info, datetime.now(UTC))
        unlimited_ns.append(clock() - t4)

    for i in range(min(1000, n)):  # warm up: connections, scripts, label children
        await one(i)
    while settling:
        await asyncio.gather(*settling)
    for samples in (admit_ns, settle_ns, unlimited_ns):
        samples.clear()

    redis_before = await redis_cpu(store)
    cpu_started = time.process_time()
    started = time.perf_counter()
    if concurrency <= 1:
        for i in range(n):
            await one(i)
    else:
        queue = iter(range(n))

        async def worker() -> None:
            for i in queue:
                await one(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    while settling:
        await asyncio.gather(*settling)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    redis_after = await redis_cpu(store)
    lines = [
        summary("admit", admit_ns),
        summary("settle", settle_ns),
        summary("no policy", unlimited_ns),
        f"  {n / elapsed:,.0f} admit+settle per second; meter process CPU "
        f"{cpu / n * 1e6:.0f} µs per admit+settle (incl. the no-policy call and the bench loop)",
    ]
    if redis_before is not None and redis_after is not None:
        seconds = redis_after[0] - redis_before[0]
        calls = redis_after[1] - redis_before[1]
        lines.append(
            f"  Redis CPU {seconds / max(calls, 1) * 1e6:.0f} µs per script call "
            f"({calls} calls; server-wide, other clients included)"
        )
    return lines


async def redis_cpu(store: QuotaStore) -> tuple[float, int] | None:
    """Redis's CPU seconds and EVALSHA count so far (deltas give CPU per script, load-independent
    where wall-clock percentiles are not)."""
    if not isinstance(store, RedisStore):
        return None
    cpu = await store.client.info("cpu")
    stats = await store.client.info("commandstats")
    calls = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), calls


async def with_store(kind: str, url: str, body: Callable[[QuotaStore], Awaitable[list[str]]]) -> list[str]:
    if kind == "memory":
        return await body(MemoryStore())
    prefix = f"meter-bench:{secrets.token_hex(6)}:"
    client = connect(url, timeout=1.0)
    store = RedisStore(client, prefix=prefix)
    try:
        return await body(store)
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
        await store.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("memory", "redis", "all"), default="all")
    parser.add_argument("--mode", choices=("sequential", "concurrent", "all"), default="all")
    parser.add_argument("-n", "--requests", type=int, default=20_000)
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")
    args = parser.parse_args()
    url = os.environ.get("METER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    stores = ("memory", "redis") if args.store == "all" else (args.store,)
    modes = ("sequential", "concurrent") if args.mode == "all" else (args.mode,)

    loop_name = "asyncio"
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
            loop_name = "uvloop"
        except ImportError:
            pass
    python = sys.version.split()[0]
    print(f"quota admission, {args.requests} requests, team + key policies, {loop_name}, python {python}")
    for kind in stores:
        for mode in modes:
            concurrency = 1 if mode == "sequential" else args.concurrency
            label = f"{kind}, {mode}" + (f" (c={concurrency})" if concurrency > 1 else "")

            async def body(store: QuotaStore, concurrency: int = concurrency) -> list[str]:
                return await run(store, args.requests, concurrency, args.keys)

            lines = asyncio.run(with_store(kind, url, body))
            print(label)
            print("\n".join(lines))


if __name__ == "__main__":
    main()
