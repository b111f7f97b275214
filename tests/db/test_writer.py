"""write_batch against real SQLite and PostgreSQL: every field round-trips, values a backend would
refuse are made storable, idempotency on event_id, batches past the parameter limit. (Outages and
poison records through the pipeline: tests/pipeline/test_pump.py.)"""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.insert import write_batch
from meter.db.models import row_to_record, usage_events
from meter.records import UsageRecord
from tests.conftest_db import (
    every_field_record,
    make_record,
)


async def count_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(usage_events))).scalar_one())


async def stored(engine: AsyncEngine, event_id: str) -> UsageRecord:
    async with engine.connect() as conn:
        row = (await conn.execute(select(usage_events).where(usage_events.c.event_id == event_id))).one()
    return row_to_record(row)


# -- write_batch: the reusable, journal-facing primitive --------------------------------------------


def test_the_round_trip_record_sets_every_field() -> None:
    record = every_field_record()
    left_default = [
        f.name
        for f in dataclasses.fields(UsageRecord)
        if f.name not in {"event_id", "reasoning_tokens"}
        and getattr(record, f.name)
        == (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    ]
    assert left_default == [], f"every_field_record() leaves {left_default} at their defaults"


async def test_every_field_round_trips(db_engine: AsyncEngine) -> None:
    record = every_field_record()
    assert await write_batch(db_engine, [record]) == 1

    back = await stored(db_engine, record.event_id)
    assert back == record
    assert back.started_at.tzinfo is UTC
    assert back.started_at == datetime(2024, 5, 2, 1, 30, 15, 123456, tzinfo=UTC)
    assert back.reasoning_tokens is None  # not reported stays not reported


async def test_values_a_backend_would_refuse_are_made_storable(db_engine: AsyncEngine) -> None:
    record = make_record(error="bad\x00byte", upstream_metrics={"nan": math.nan, "inf": math.inf, "ok": 1.5})
    assert await write_batch(db_engine, [record]) == 1
    back = await stored(db_engine, record.event_id)
    assert back.error == "bad\ufffdbyte"
    assert back.upstream_metrics == {"nan": None, "inf": None, "ok": 1.5}


async def test_naive_started_at_is_taken_as_utc(db_engine: AsyncEngine) -> None:
    record = make_record(started_at=datetime(2024, 5, 1, 12, 0))
    await write_batch(db_engine, [record])
    assert (await stored(db_engine, record.event_id)).started_at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


async def test_write_batch_is_idempotent_on_event_id(db_engine: AsyncEngine) -> None:
    first = [make_record() for _ in range(10)]
    assert await write_batch(db_engine, first) == 10
    assert await write_batch(db_engine, first) == 0  # a full replay inserts nothing
    more = [make_record() for _ in range(5)]
    assert await write_batch(db_engine, first[:5] + more) == 5  # a partial replay inserts only the new
    twice = make_record()
    assert await write_batch(db_engine, [twice, twice]) == 1  # duplicates inside one batch
    assert await write_batch(db_engine, []) == 0
    assert await count_rows(db_engine) == 16


async def test_write_batch_splits_batches_larger_than_the_parameter_limit(db_engine: AsyncEngine) -> None:
    # 2,500 rows x 32 columns = 80,000 bind parameters: above both SQLite's and asyncpg's limit.
    records = [make_record() for _ in range(2_500)]
    assert await write_batch(db_engine, records) == 2_500
    assert await count_rows(db_engine) == 2_500
