"""Writer throughput: how fast the journal pump moves usage records into the database.

Fills a fresh journal with N synthetic records (200 keys in 5 teams, 5 models, 2 endpoints, one
record every 50 ms of event time), then times one :class:`~meter.pipeline.pump.Pipeline` draining it into a
freshly created and migrated database, hourly rollup included. Prints the append rate (the request
path's cost), the drain rate in events per second, and the process CPU the drain took per event: in
all threads (SQLite works in aiosqlite's thread, mostly without the GIL) and on the event loop's
thread alone (what a proxy sharing the process loses to its writer); and the longest the drain held
the event loop (a 1 ms timer's lateness, max and p99): what a request in flight waits out.

    .venv/bin/python bench/writer_throughput.py                     # PostgreSQL and SQLite
    .venv/bin/python bench/writer_throughput.py --events 500000 --backend postgres
    METER_BENCH_POSTGRES_URL=postgresql://postgres@db:5432/postgres .venv/bin/python bench/...

PostgreSQL is the machine's server at 127.0.0.1:5432 (user postgres) unless
``METER_BENCH_POSTGRES_URL`` names another admin URL; a database ``meter_bench_<hex>`` is created
and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meter.db import migrate
from meter.db.engine import create_engine
from meter.db.models import usage_events, usage_hourly
from meter.journal.store import Journal
from meter.pipeline.pump import Pipeline
from meter.records import Outcome, UsageRecord, UsageSource, new_event_id
from meter.settings import Settings

ADMIN_URL = os.environ.get("METER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def synthetic_records(count: int, seed: int = 7) -> list[UsageRecord]:
    rng = random.Random(seed)
    teams = ["search", "ads", "chat", "eval", ""]
    models = ["llama-v3p1-8b", "llama-v3p1-70b", "mixtral-8x22b", "qwen2p5-72b", None]
    # 200 keys; a key belongs to one team and mostly uses two models, as in real traffic. Hundreds of
    # distinct rollup rows per batch all the same: a demanding case for the rollup upsert.
    keys = [secrets.token_hex(32) for _ in range(200)]
    team_of = {key: rng.choice(teams) for key in keys}
    models_of = {key: rng.sample(models, 2) for key in keys}
    start = datetime(2024, 11, 1, tzinfo=UTC)
    records = []
    for i in range(count):
        key = rng.choice(keys)
        prompt, completion = rng.randint(10, 4000), rng.randint(1, 1000)
        missing = rng.random() < 0.02
        records.append(
            UsageRecord(
                event_id=new_event_id(),
                started_at=start + timedelta(seconds=i * 0.05),
                method="POST",
                endpoint=rng.choice(["/v1/chat/completions", "/v1/completions"]),
                status_code=200 if not missing else 499,
                outcome=Outcome.OK if not missing else Outcome.ABORTED,
                usage_source=UsageSource.REPORTED if not missing else UsageSource.MISSING,
                stream=rng.random() < 0.7,
                key_fingerprint=key,
                key_suffix="..." + key[-4:],
                team=team_of[key],
                requested_model=rng.choice(models_of[key]),
                response_model="accounts/fireworks/models/llama-v3p1-8b-instruct",
                response_id=f"chatcmpl-{i}",
                request_id=secrets.token_hex(8),
                finish_reason="stop",
                prompt_tokens=None if missing else prompt,
                completion_tokens=None if missing else completion,
                cached_tokens=None if missing else prompt // 3,
                reasoning_tokens=None,
                total_tokens=None if missing else prompt + completion,
                duration_ms=rng.uniform(100, 5000),
                upstream_headers_ms=rng.uniform(20, 300),
                ttft_ms=rng.uniform(30, 400),
                output_tokens_per_second=rng.uniform(20, 200),
                overhead_ms=rng.uniform(0.1, 2),
                server_ttft_ms=rng.uniform(20, 300),
                server_processing_ms=rng.uniform(50, 4000),
                upstream_metrics={"prefill_ms": rng.uniform(1, 50), "queue_ms": rng.uniform(0, 5)},
                request_bytes=rng.randint(200, 20000),
                response_bytes=rng.randint(200, 20000),
            )
        )
    return records


async def run(backend: str, records: list[UsageRecord], batch_size: int, concurrency: int | None) -> None:
    with tempfile.TemporaryDirectory(prefix="meter-bench-") as tmp:
        if backend == "postgresql":
            name = f"meter_bench_{secrets.token_hex(6)}"
            admin = await asyncpg.connect(ADMIN_URL)
            await admin.execute(f'CREATE DATABASE "{name}"')
            url = ADMIN_URL.rpartition("/")[0] + "/" + name
        else:
            url = f"sqlite:///{tmp}/meter.db"
        try:
            await migrate.upgrade(url)
            engine = create_engine(url)
            journal = Journal.open(Path(tmp) / "journal")
            started = time.perf_counter()
            for record in records:
                journal.append(record)
            append_s = time.perf_counter() - started
            pipeline = Pipeline(
                journal, engine, registry=CollectorRegistry(), batch_size=batch_size, concurrency=concurrency
            )
            started = time.perf_counter()
            cpu, loop_cpu = time.process_time(), time.thread_time()
            stalls: list[float] = []
            probe = asyncio.create_task(_probe_loop(stalls))
            await pipeline.start()
            assert await pipeline.flush(timeout=600)
            drain_s = time.perf_counter() - started
            probe.cancel()
            cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
            await pipeline.stop(timeout=10)
            async with engine.connect() as conn:
                rows = (await conn.execute(select(func.count()).select_from(usage_events))).scalar_one()
                rolled = (await conn.execute(select(func.sum(usage_hourly.c.requests)))).scalar_one()
            await engine.dispose()
            assert rows == len(records) and int(rolled) == len(records), (rows, rolled)
            print(
                f"{backend:>10}: {len(records):,} events, "
                f"batch {batch_size} x{pipeline.concurrency} in flight: "
                f"append {len(records) / append_s:,.0f}/s ({append_s * 1e6 / len(records):.1f} µs each), "
                f"drain to database {len(records) / drain_s:,.0f} events/s ({drain_s:.2f}s), "
                f"CPU {cpu * 1e6 / len(records):.1f} µs/event "
                f"({loop_cpu * 1e6 / len(records):.1f} on the event loop); "
                f"loop held up to {max(stalls, default=0.0):.1f} ms (p99 {_p99(stalls):.1f})"
            )
        finally:
            if backend == "postgresql":
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                await admin.close()


async def _probe_loop(stalls: list[float], every_s: float = 0.001) -> None:
    """How late a 1 ms timer fires, again and again: the time the event loop was held by something
    else (the drain), which every request a proxy has in flight would wait out."""
    while True:
        due = time.perf_counter() + every_s
        await asyncio.sleep(every_s)
        stalls.append(max(0.0, time.perf_counter() - due) * 1000)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # meter's servers run on uvloop
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=Settings().writer_batch_size)
    parser.add_argument("--backend", choices=["postgres", "sqlite", "both"], default="both")
    parser.add_argument("--concurrency", type=int, default=None, help="batches in flight (default: auto)")
    args = parser.parse_args()
    records = synthetic_records(args.events)
    gc.collect()
    gc.freeze()  # as meter serve does after start-up: the bench's own records are no garbage to scan
    backends = {"postgres": ["postgresql"], "sqlite": ["sqlite"], "both": ["postgresql", "sqlite"]}
    for backend in backends[args.backend]:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run(backend, records, args.batch_size, args.concurrency))


if __name__ == "__main__":
    main()
