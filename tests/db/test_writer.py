"""write_batch and BatchWriter against real SQLite and PostgreSQL: batching, idempotency, outages,
poison records, overflow. Synchronisation is by awaiting outcomes (flush, stop, on_error events),
never by sleeping."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db import migrate
from meter.db.engine import create_engine
from meter.db.insert import write_batch
from meter.db.models import row_to_record, usage_events
from meter.db.writer import BatchWriter, PendingOverflowError, RecordRejectedError
from meter.records import UsageRecord
from tests.conftest_db import (
    create_database,
    drop_database,
    every_field_record,
    make_record,
    postgres_url_for,
    unique_database_name,
)


def fast_retrying_writer(engine: AsyncEngine, **options: Any) -> BatchWriter:
    """A writer whose retry backoff is short, so outage tests finish quickly."""
    return BatchWriter(engine, retry_initial=0.01, retry_max=0.05, **options)


async def count_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(usage_events))).scalar_one())


async def stored(engine: AsyncEngine, event_id: str) -> UsageRecord:
    async with engine.connect() as conn:
        row = (await conn.execute(select(usage_events).where(usage_events.c.event_id == event_id))).one()
    return row_to_record(row)


class ErrorLog:
    """An on_error callback that lets a test await the n-th report."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self._changed = asyncio.Event()

    def __call__(self, exc: Exception) -> None:
        self.errors.append(exc)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.errors) < count:
                self._changed.clear()
                await self._changed.wait()


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


# -- BatchWriter on a healthy database ------------------------------------------------------------


async def test_writer_writes_in_batches_and_stop_flushes_everything(db_engine: AsyncEngine) -> None:
    writer = BatchWriter(db_engine, batch_size=100, flush_interval=0.01)
    records = [make_record() for _ in range(1_234)]
    await writer.start()
    for record in records:
        writer.submit(record)
    assert writer.pending == 1_234  # submit only queues; nothing has been awaited yet
    await writer.stop()

    assert (writer.pending, writer.written, writer.duplicates, writer.failed_batches) == (0, 1_234, 0, 0)
    assert await count_rows(db_engine) == 1_234
    assert not writer.running


async def test_replaying_records_through_the_writer_inserts_nothing_new(db_engine: AsyncEngine) -> None:
    records = [make_record() for _ in range(50)]
    await write_batch(db_engine, records)
    writer = BatchWriter(db_engine, batch_size=20)
    await writer.start()
    for record in records:
        writer.submit(record)
    await writer.stop()
    assert (writer.written, writer.duplicates) == (50, 50)
    assert await count_rows(db_engine) == 50


async def test_flush_waits_until_submitted_records_are_visible(db_engine: AsyncEngine) -> None:
    # A long flush_interval proves flush() does not wait for a batch to fill.
    writer = BatchWriter(db_engine, batch_size=500, flush_interval=60)
    await writer.start()
    try:
        for _ in range(3):
            writer.submit(make_record())
        async with asyncio.timeout(10):
            await writer.flush()
        assert await count_rows(db_engine) == 3
        assert writer.pending == 0
    finally:
        await writer.stop()


async def test_records_submitted_before_start_are_kept_and_written(db_engine: AsyncEngine) -> None:
    writer = BatchWriter(db_engine)
    for _ in range(7):
        writer.submit(make_record())
    assert writer.pending == 7
    await writer.start()
    await writer.stop()
    assert writer.written == 7


async def test_a_poison_record_is_isolated_and_the_rest_are_written(db_engine: AsyncEngine) -> None:
    errors = ErrorLog()
    writer = fast_retrying_writer(db_engine, batch_size=64, on_error=errors)
    poison = make_record(prompt_tokens=2**70)  # out of BIGINT range on both backends
    records = [make_record() for _ in range(30)] + [poison] + [make_record() for _ in range(33)]
    await writer.start()
    for record in records:
        writer.submit(record)
    await writer.stop()

    assert (writer.written, writer.rejected, writer.pending, writer.failed_batches) == (63, 1, 0, 0)
    assert [record for record, _ in writer.rejected_records()] == [poison]
    assert await count_rows(db_engine) == 63
    [report] = errors.errors
    assert isinstance(report, RecordRejectedError) and report.record is poison


# -- BatchWriter when the database is unavailable -------------------------------------------------


@pytest.fixture
async def unreachable_engine() -> AsyncIterator[AsyncEngine]:
    engine = create_engine("postgresql://postgres@127.0.0.1:1/meter")  # nothing listens on port 1
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_unreachable_database_keeps_records_pending(unreachable_engine: AsyncEngine) -> None:
    errors = ErrorLog()
    writer = fast_retrying_writer(unreachable_engine, batch_size=4, on_error=errors)
    records = [make_record() for _ in range(10)]
    for record in records[:6]:
        writer.submit(record)
    await writer.start()
    await errors.wait_for(3)
    for record in records[6:]:
        writer.submit(record)  # still accepted, still no exception into the request path

    assert writer.pending == 10
    assert writer.written == 0 and writer.rejected == 0
    assert writer.failed_batches >= 3
    assert all(isinstance(exc, OSError) for exc in errors.errors)

    await writer.stop(timeout=0.1)  # cannot flush: gives up on time and keeps the records
    assert not writer.running
    assert writer.pending == 10
    assert writer.unwritten() == records  # in submission order, the in-flight batch first


async def test_overflow_refuses_new_records_and_counts_them(unreachable_engine: AsyncEngine) -> None:
    errors = ErrorLog()
    writer = BatchWriter(unreachable_engine, batch_size=5, max_pending=5, on_error=errors)
    for _ in range(8):
        writer.submit(make_record())
    assert (writer.pending, writer.dropped) == (5, 3)
    assert len(errors.errors) == 1 and isinstance(errors.errors[0], PendingOverflowError)


async def test_missing_table_is_an_outage_not_a_poison_record(db_url: str) -> None:
    # A database that was never migrated refuses every statement; that must be retried, not rejected.
    engine = create_engine(db_url)
    errors = ErrorLog()
    writer = fast_retrying_writer(engine, batch_size=10, on_error=errors)
    try:
        for _ in range(25):
            writer.submit(make_record())
        await writer.start()
        await errors.wait_for(2)
        assert (writer.pending, writer.rejected) == (25, 0)

        await migrate.upgrade(db_url)
        async with asyncio.timeout(10):
            await writer.flush()
        assert (writer.pending, writer.written, writer.rejected) == (0, 25, 0)
        assert await count_rows(engine) == 25
    finally:
        await writer.stop()
        await engine.dispose()


@pytest.mark.postgres
async def test_writer_recovers_when_the_postgres_database_appears() -> None:
    name = unique_database_name()
    url = postgres_url_for(name)  # does not exist yet: every connection attempt fails
    engine = create_engine(url)
    errors = ErrorLog()
    writer = fast_retrying_writer(engine, batch_size=10, on_error=errors)
    try:
        records = [make_record() for _ in range(15)]
        for record in records:
            writer.submit(record)
        await writer.start()
        await errors.wait_for(2)
        assert writer.pending == 15

        await create_database(name)
        await migrate.upgrade(url)
        async with asyncio.timeout(10):
            await writer.flush()
        assert (writer.pending, writer.written, writer.rejected) == (0, 15, 0)
        assert await count_rows(engine) == 15
    finally:
        await writer.stop()
        await engine.dispose()
        await drop_database(name)


async def test_writer_recovers_when_the_sqlite_directory_appears(tmp_path: Path) -> None:
    directory = tmp_path / "not-yet"
    url = f"sqlite:///{directory / 'meter.db'}"
    engine = create_engine(url)
    errors = ErrorLog()
    writer = fast_retrying_writer(engine, on_error=errors)
    try:
        writer.submit(make_record())
        await writer.start()
        await errors.wait_for(1)
        assert writer.pending == 1

        directory.mkdir()
        await migrate.upgrade(url)
        async with asyncio.timeout(10):
            await writer.flush()
        assert (writer.pending, writer.written) == (0, 1)
    finally:
        await writer.stop()
        await engine.dispose()


async def test_constructor_rejects_nonsense_settings(unreachable_engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        BatchWriter(unreachable_engine, batch_size=0)
    with pytest.raises(ValueError, match="max_pending"):
        BatchWriter(unreachable_engine, batch_size=10, max_pending=5)
