"""The hourly rollup against real SQLite and PostgreSQL: it always equals the sums of the raw events
(for every grouping and filter, after replays and concurrent writers), hours are UTC, "not reported"
survives, the migration backfills it, and retention deletes raw events but keeps it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db import migrate
from meter.db.engine import create_engine
from meter.db.insert import write_batch
from meter.db.models import record_to_row, usage_events, usage_hourly
from meter.db.queries import usage_summary
from meter.db.rollups import delete_events_before, hour_of, is_hour_aligned
from meter.records import Outcome, UsageSource
from tests.conftest_db import make_record
from tests.support.rollups import START, assert_rollup_equals_raw, dataset


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def test_rollups_equal_raw_sums_for_every_grouping_and_filter(db_engine: AsyncEngine) -> None:
    records = dataset(600)
    for start in range(0, 600, 200):
        await write_batch(db_engine, records[start : start + 200])
    # Replays: a whole batch again, and a batch half old, half new. Neither may count twice.
    assert await write_batch(db_engine, records[200:400]) == 0
    extra = dataset(50, seed=2)
    assert await write_batch(db_engine, records[:50] + extra) == 50
    records += extra

    assert await count(db_engine, usage_events) == 650
    [totals] = await usage_summary(db_engine, source="rollup")
    assert totals["requests"] == 650
    assert totals["prompt_tokens"] == sum(r.prompt_tokens or 0 for r in records)
    assert totals["errors"] == sum(r.outcome != Outcome.OK for r in records)
    assert totals["records_missing_usage"] == sum(r.usage_source == UsageSource.MISSING for r in records)

    await assert_rollup_equals_raw(db_engine)
    await assert_rollup_equals_raw(
        db_engine, since=START + timedelta(hours=5), until=START + timedelta(days=2)
    )
    await assert_rollup_equals_raw(db_engine, key_fingerprint="a" * 64, team="search")
    await assert_rollup_equals_raw(db_engine, model="", endpoint="/v1/completions")
    await assert_rollup_equals_raw(db_engine, model="llama")


async def test_hours_are_utc_and_none_stays_apart_from_empty(db_engine: AsyncEngine) -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    await write_batch(
        db_engine,
        [
            make_record(
                started_at=datetime(2024, 5, 1, 10, 59, 59, 999999, tzinfo=UTC), requested_model=None
            ),
            make_record(started_at=datetime(2024, 5, 1, 11, 0, tzinfo=UTC), requested_model=""),
            make_record(started_at=datetime(2024, 5, 1, 0, 30, tzinfo=ist), requested_model=""),  # 19:00 UTC
            make_record(
                started_at=datetime(2024, 5, 1, 11, 15), requested_model="", prompt_tokens=5
            ),  # naive: UTC
        ],
    )
    async with db_engine.connect() as conn:
        rows = (
            await conn.execute(
                select(usage_hourly.c.hour, usage_hourly.c.requested_model, usage_hourly.c.null_dims,
                       usage_hourly.c.requests, usage_hourly.c.prompt_tokens,
                       usage_hourly.c.prompt_tokens_records).order_by(usage_hourly.c.hour)
            )
        ).all()  # fmt: skip
    assert [tuple(row) for row in rows] == [
        (datetime(2024, 4, 30, 19, 0, tzinfo=UTC), "", 1, 1, 0, 0),
        (datetime(2024, 5, 1, 10, 0, tzinfo=UTC), "", 3, 1, 0, 0),  # no key (1) and no model (2)
        (datetime(2024, 5, 1, 11, 0, tzinfo=UTC), "", 1, 2, 5, 1),
    ]
    by_model = await usage_summary(db_engine, group_by=["model"])
    assert [(r["requested_model"], r["requests"], r["prompt_tokens"]) for r in by_model] == [
        ("", 3, 5),
        (None, 1, None),
    ]
    await assert_rollup_equals_raw(db_engine)


async def test_concurrent_writers_of_overlapping_batches_count_each_record_once(
    db_engine: AsyncEngine,
) -> None:
    records = dataset(400, seed=3)
    batches = [records[0:200], records[100:300], records[200:400], records[0:400]]
    inserted = await asyncio.gather(*(write_batch(db_engine, batch) for batch in batches))
    assert sum(inserted) == 400
    await assert_rollup_equals_raw(db_engine)


async def test_the_migration_backfills_the_rollup_from_existing_events(db_url: str) -> None:
    await migrate.upgrade(db_url, "0001")
    engine = create_engine(db_url)
    try:
        async with engine.begin() as conn:  # written by a meter that had no rollup (and no cost) yet
            rows = [record_to_row(r) for r in dataset(300, seed=4)]
            for row in rows:
                del row["cost_nanos"], row["price_ref"]  # added by 0003
            await conn.execute(insert(usage_events), rows)
        await migrate.upgrade(db_url)
        assert await count(engine, usage_hourly) > 0
        await assert_rollup_equals_raw(engine)
    finally:
        await engine.dispose()


async def test_retention_deletes_old_raw_events_in_chunks_and_keeps_the_rollup(
    db_engine: AsyncEngine,
) -> None:
    records = dataset(300, seed=5)
    await write_batch(db_engine, records)
    before = await usage_summary(db_engine, group_by=["day", "team"])
    cutoff = START + timedelta(days=2)
    old = sum(r.started_at < cutoff for r in records)

    assert await delete_events_before(db_engine, cutoff, chunk=7) == old
    assert await count(db_engine, usage_events) == 300 - old
    assert await delete_events_before(db_engine, cutoff, chunk=7) == 0

    # Hour-aligned reports come from the rollup, which still has every event.
    assert await usage_summary(db_engine, group_by=["day", "team"]) == before
    # An unaligned range is summed from raw events, so it only sees what retention left.
    [raw] = await usage_summary(db_engine, since=START + timedelta(minutes=1))
    assert raw["requests"] == 300 - old


def test_hour_alignment_is_judged_in_utc() -> None:
    assert is_hour_aligned(None)
    assert is_hour_aligned(datetime(2024, 5, 1, 12))
    assert is_hour_aligned(datetime(2024, 5, 1, 14, tzinfo=timezone(timedelta(hours=2))))
    assert not is_hour_aligned(datetime(2024, 5, 1, 0, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))))
    assert not is_hour_aligned(datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC))
    assert hour_of(datetime(2024, 5, 1, 0, 30, tzinfo=timezone(timedelta(hours=5, minutes=30)))) == datetime(
        2024, 4, 30, 19, tzinfo=UTC
    )


async def test_a_rollup_only_report_refuses_an_unaligned_range(db_engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="hour boundary"):
        await usage_summary(db_engine, since=START + timedelta(minutes=5), source="rollup")
