"""The journal -> database pipeline against real SQLite and PostgreSQL: exactly-once through outages,
restarts, crashes and replays; poison records and damaged frames dead-lettered; the request path
never sees an error; metrics, status and readiness say what is going on."""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db import migrate
from meter.db.engine import create_engine
from meter.db.insert import write_batch
from meter.db.models import usage_events
from meter.db.queries import usage_summary
from meter.errors import JournalLocked
from meter.journal.frames import segment_name
from meter.journal.store import Journal, journal_status
from meter.pipeline.pump import Pipeline
from meter.pipeline.replay import replay
from meter.records import UsageRecord
from tests.conftest_db import make_record
from tests.support.rollups import assert_rollup_equals_raw, dataset

START = datetime(2024, 5, 1, tzinfo=UTC)


def pipeline_for(journal: Journal, engine: AsyncEngine, **options: Any) -> Pipeline:
    """A pipeline with a fresh registry and short retry backoff, so outage tests finish quickly."""
    options = {"retry_initial": 0.01, "retry_max": 0.05, "flush_interval": 0.01, **options}
    return Pipeline(journal, engine, registry=CollectorRegistry(), **options)


def metric(pipeline: Pipeline, name: str, **labels: str) -> float:
    value = pipeline.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def eventually(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait (with a deadline) until ``condition()`` holds: waiting on an outcome, not a guessed time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(usage_events))).scalar_one())


def dead_letters(journal_dir: Path) -> list[dict[str, Any]]:
    path = journal_dir / "dead-letter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fill_journal(directory: Path, records: list[UsageRecord]) -> None:
    with Journal.open(directory) as journal:
        for record in records:
            journal.append(record)


@pytest.fixture
async def unreachable_engine() -> AsyncIterator[AsyncEngine]:
    engine = create_engine("postgresql://postgres@127.0.0.1:1/meter")  # nothing listens on port 1
    try:
        yield engine
    finally:
        await engine.dispose()


# -- the healthy path ----------------------------------------------------------------------------


async def test_every_submitted_record_reaches_the_database_once(
    db_engine: AsyncEngine, tmp_path: Path
) -> None:
    records = dataset(1234)
    pipeline = pipeline_for(Journal.open(tmp_path / "j"), db_engine, batch_size=100)
    await pipeline.start()
    for record in records:
        pipeline.submit(record)
    assert await pipeline.flush(timeout=30)
    status = pipeline.status()
    await pipeline.stop(timeout=10)

    assert await rows(db_engine) == 1234
    assert (status["pending"], status["written"], status["duplicates"], status["dead_lettered"]) == (
        0,
        1234,
        0,
        0,
    )
    assert status["database_ok"] is True and status["journal_ok"] is True
    assert metric(pipeline, "meter_writer_events_written_total") == 1234
    assert metric(pipeline, "meter_journal_pending_events") == 0
    assert metric(pipeline, "meter_writer_batch_size_sum") == 1234
    assert metric(pipeline, "meter_writer_batch_size_count") >= 13
    assert metric(pipeline, "meter_writer_write_duration_seconds_count") >= 13
    await assert_rollup_equals_raw(db_engine)
    # A cleanly stopped, fully drained journal keeps nothing but its checkpoint.
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == ["LOCK", "checkpoint"]


async def test_two_processes_with_their_own_journals_share_one_database(
    db_engine: AsyncEngine, tmp_path: Path
) -> None:
    records = dataset(600, seed=7)
    pipelines = [
        pipeline_for(Journal.open_any(tmp_path / "root"), db_engine, batch_size=50) for _ in range(2)
    ]
    assert [p.journal.directory.name for p in pipelines] == ["w0", "w1"]
    for pipeline in pipelines:
        await pipeline.start()
    for index, record in enumerate(records):
        pipelines[index % 2].submit(record)
        if index % 10 == 0:
            pipelines[(index + 1) % 2].submit(record)  # some records reach both processes
    for pipeline in pipelines:
        assert await pipeline.flush(timeout=30)
        await pipeline.stop(timeout=10)
    assert await rows(db_engine) == 600
    await assert_rollup_equals_raw(db_engine)


# -- outages, restarts, crashes ------------------------------------------------------------------


async def test_a_database_outage_piles_up_on_disk_and_drains_exactly_once(
    db_url: str, tmp_path: Path
) -> None:
    engine = create_engine(db_url)  # never migrated: every statement fails, as in an outage
    pipeline = pipeline_for(Journal.open(tmp_path / "j"), engine, batch_size=50)
    try:
        await pipeline.start()
        records = dataset(300, seed=8)
        for record in records[:150]:
            pipeline.submit(record)
        await eventually(lambda: pipeline.status()["write_errors"] >= 2, what="failed write attempts")
        for record in records[150:]:
            pipeline.submit(record)  # never raises, never waits

        status = pipeline.status()
        assert status["pending"] == 300 and status["in_memory"] == 0  # the backlog is on disk
        assert status["database_ok"] is False and status["last_error"]
        assert metric(pipeline, "meter_writer_errors_total") >= 2
        assert metric(pipeline, "meter_journal_pending_events") == 300
        [on_disk] = journal_status(tmp_path / "j")
        assert on_disk.pending_events == 300 and on_disk.pending_bytes > 300 * 500
        readiness = pipeline.readiness(min_free_bytes=0)
        assert readiness["ready"] is True  # the journal absorbs the outage
        assert readiness["reason"].startswith("database unavailable") and "300 events" in readiness["reason"]

        await migrate.upgrade(db_url)  # the database comes back
        assert await pipeline.flush(timeout=30)
        assert await rows(engine) == 300
        status = pipeline.status()
        assert (status["pending"], status["written"], status["duplicates"]) == (0, 300, 0)
        assert status["database_ok"] is True and pipeline.readiness(min_free_bytes=0)["reason"] == "ok"
        await assert_rollup_equals_raw(engine)
    finally:
        await pipeline.stop(timeout=5)
        await engine.dispose()


async def test_stop_leaves_the_backlog_in_the_journal_for_the_next_start(
    unreachable_engine: AsyncEngine, db_engine: AsyncEngine, tmp_path: Path
) -> None:
    records = dataset(120, seed=9)
    first = pipeline_for(Journal.open(tmp_path / "j"), unreachable_engine)
    await first.start()
    for record in records:
        first.submit(record)
    await eventually(lambda: first.status()["write_errors"] >= 1, what="a failed write")
    await first.stop(timeout=0.2)  # cannot drain: gives up on time
    assert journal_status(tmp_path / "j")[0].pending_events == 120

    second = pipeline_for(Journal.open(tmp_path / "j"), db_engine)  # the restart
    assert second.pending == 120
    await second.start()
    assert await second.flush(timeout=30)
    await second.stop(timeout=10)
    assert await rows(db_engine) == 120
    await assert_rollup_equals_raw(db_engine)


async def test_a_crash_between_database_commit_and_checkpoint_does_not_double_count(
    db_engine: AsyncEngine, tmp_path: Path
) -> None:
    records = dataset(200, seed=10)
    fill_journal(tmp_path / "j", records)
    await write_batch(db_engine, records[:120])  # the dead process had written these, not checkpointed
    pipeline = pipeline_for(Journal.open(tmp_path / "j"), db_engine)
    await pipeline.start()
    assert await pipeline.flush(timeout=30)
    await pipeline.stop(timeout=10)
    assert await rows(db_engine) == 200
    assert metric(pipeline, "meter_writer_duplicate_events_total") == 120
    [totals] = await usage_summary(db_engine)
    assert totals["requests"] == 200
    await assert_rollup_equals_raw(db_engine)


async def test_replaying_the_same_journal_twice_inserts_nothing_new(
    db_engine: AsyncEngine, tmp_path: Path
) -> None:
    records = dataset(500, seed=11)
    fill_journal(tmp_path / "dead-pod", records)
    shutil.copytree(tmp_path / "dead-pod", tmp_path / "copy")

    first = await replay(tmp_path / "dead-pod", db_engine)
    assert (first.read, first.written, first.inserted, first.remaining) == (500, 500, 500, 0)
    assert first.directories == [tmp_path / "dead-pod"]
    assert journal_status(tmp_path / "dead-pod")[0].pending_events == 0

    second = await replay(tmp_path / "copy", db_engine)
    assert (second.written, second.inserted) == (500, 0)
    assert await rows(db_engine) == 500
    [totals] = await usage_summary(db_engine)
    assert totals["requests"] == 500
    await assert_rollup_equals_raw(db_engine)


async def test_replay_leaves_live_journals_alone(db_engine: AsyncEngine, tmp_path: Path) -> None:
    root = tmp_path / "pod"
    fill_journal(root / "w1", dataset(10, seed=12))
    with Journal.open(root / "w0") as live:
        live.append(make_record())
        result = await replay(root, db_engine)
        assert result.directories == [root / "w1"] and result.skipped_locked == [root / "w0"]
        assert result.inserted == 10
        with pytest.raises(JournalLocked):
            await replay(root / "w0", db_engine)
    with pytest.raises(FileNotFoundError):
        await replay(tmp_path / "nowhere", db_engine)


# -- records the database refuses, damaged frames, a failing journal ------------------------------


async def test_poison_records_are_dead_lettered_and_the_rest_written(
    db_engine: AsyncEngine, tmp_path: Path
) -> None:
    good = dataset(40, seed=13)
    too_big = make_record(prompt_tokens=2**70)  # out of BIGINT range on both backends
    no_team = make_record(team=None)  # NOT NULL
    records = [*good[:10], too_big, *good[10:30], no_team, *good[30:]]
    pipeline = pipeline_for(Journal.open(tmp_path / "j"), db_engine, batch_size=64)
    await pipeline.start()
    for record in records:
        pipeline.submit(record)
    assert await pipeline.flush(timeout=30)
    await pipeline.stop(timeout=10)

    assert await rows(db_engine) == 40
    letters = dead_letters(tmp_path / "j")
    assert sorted(letter["event_id"] for letter in letters) == sorted([too_big.event_id, no_team.event_id])
    assert all(letter["kind"] == "rejected" and letter["reason"] for letter in letters)
    by_id = {letter["event_id"]: letter for letter in letters}
    assert by_id[too_big.event_id]["record"]["prompt_tokens"] == 2**70  # the record, exactly
    assert metric(pipeline, "meter_journal_dead_lettered_total", reason="rejected") == 2
    assert pipeline.status()["dead_lettered"] == 2
    assert journal_status(tmp_path / "j")[0].pending_events == 0  # the checkpoint moved past them
    await assert_rollup_equals_raw(db_engine)


async def test_a_damaged_journal_frame_is_dead_lettered_and_skipped(
    db_engine: AsyncEngine, tmp_path: Path
) -> None:
    records = dataset(30, seed=14)
    fill_journal(tmp_path / "j", records)
    segment = tmp_path / "j" / segment_name(1)
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))

    pipeline = pipeline_for(Journal.open(tmp_path / "j"), db_engine)
    await pipeline.start()
    assert await pipeline.flush(timeout=30)
    await pipeline.stop(timeout=10)
    assert await rows(db_engine) == 29
    [letter] = dead_letters(tmp_path / "j")
    assert letter["kind"] == "corrupt" and letter["reason"] == "frame checksum mismatch"
    assert letter["segment"] == 1 and letter["length"] > 0 and letter["data_base64"]
    assert metric(pipeline, "meter_journal_dead_lettered_total", reason="corrupt") == 1


async def test_submit_never_raises_and_keeps_records_when_the_journal_fails(
    db_engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal.open(tmp_path / "j")
    pipeline = pipeline_for(journal, db_engine)
    await pipeline.start()

    def disk_full(record: UsageRecord) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal, "append", disk_full)
    for record in dataset(5, seed=15):
        pipeline.submit(record)
    assert metric(pipeline, "meter_journal_append_errors_total") == 5
    readiness = pipeline.readiness(min_free_bytes=0)
    assert readiness["ready"] is False and "No space left" in readiness["reason"]
    assert await pipeline.flush(timeout=30)  # the writer takes them from memory
    assert await rows(db_engine) == 5

    monkeypatch.undo()  # the disk recovers
    pipeline.submit(make_record())
    assert pipeline.readiness(min_free_bytes=0)["ready"] is True
    assert await pipeline.flush(timeout=30)
    await pipeline.stop(timeout=10)
    assert await rows(db_engine) == 6

    pipeline.submit(make_record())  # after stop: counted as lost, still no exception
    assert metric(pipeline, "meter_journal_dropped_events_total") == 1


async def test_a_failing_checkpoint_write_is_retried_not_fatal(
    db_engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal.open(tmp_path / "j")
    pipeline = pipeline_for(journal, db_engine)
    real_commit = journal.commit
    failures = 0
    disk_broken = True

    def flaky_commit(position: Any, frames: int) -> None:
        nonlocal failures
        if disk_broken:
            failures += 1
            raise OSError(errno.EIO, "Input/output error")
        real_commit(position, frames)

    monkeypatch.setattr(journal, "commit", flaky_commit)
    await pipeline.start()
    for record in dataset(20, seed=16):
        pipeline.submit(record)
    await eventually(lambda: failures >= 2, what="failed checkpoint writes")
    readiness = pipeline.readiness(min_free_bytes=0)
    assert readiness["ready"] is False and "Input/output error" in readiness["reason"]
    disk_broken = False
    assert await pipeline.flush(timeout=30)
    await pipeline.stop(timeout=10)
    assert pipeline.status()["journal_ok"] is True
    assert await rows(db_engine) == 20 and pipeline.status()["written"] == 20
    assert journal_status(tmp_path / "j")[0].pending_events == 0


async def test_a_full_disk_makes_the_process_not_ready(db_engine: AsyncEngine, tmp_path: Path) -> None:
    pipeline = pipeline_for(Journal.open(tmp_path / "j"), db_engine)
    await pipeline.start()
    try:
        readiness = pipeline.readiness(min_free_bytes=2**62)
        assert readiness["ready"] is False and "almost full" in readiness["reason"]
    finally:
        await pipeline.stop(timeout=5)
    assert pipeline.readiness()["ready"] is False  # stopped


# -- metrics with a fake clock, retention ---------------------------------------------------------


async def test_pending_and_oldest_age_gauges(unreachable_engine: AsyncEngine, tmp_path: Path) -> None:
    now = START + timedelta(hours=1)
    pipeline = pipeline_for(Journal.open(tmp_path / "j"), unreachable_engine, clock=now.timestamp)
    for minutes in (10, 20, 30):  # before start: nothing is written
        pipeline.submit(make_record(started_at=now - timedelta(minutes=minutes), duration_ms=2000.0))
    assert metric(pipeline, "meter_journal_pending_events") == 3
    # The first journaled record's request ended 10 minutes minus its 2 s duration ago.
    assert metric(pipeline, "meter_journal_oldest_pending_age_seconds") == 600 - 2
    assert pipeline.status()["oldest_pending_age_s"] == 598
    await pipeline.stop(timeout=0.1)


async def test_retention_deletes_old_raw_events_and_dead_letters_expired_records(
    db_engine: AsyncEngine, tmp_path: Path
) -> None:
    now = START + timedelta(days=40)
    old = [make_record(started_at=START + timedelta(hours=i), prompt_tokens=10) for i in range(5)]
    await write_batch(db_engine, old)  # written long ago
    pipeline = pipeline_for(
        Journal.open(tmp_path / "j"),
        db_engine,
        retention_days=30,
        clock=now.timestamp,
        retention_interval=3600,
    )
    assert await pipeline.run_retention() == 5
    assert metric(pipeline, "meter_retention_deleted_events_total") == 5
    assert await rows(db_engine) == 0
    [kept] = await usage_summary(db_engine)  # the rollup still knows them
    assert (kept["requests"], kept["prompt_tokens"]) == (5, 50)

    # A journal replayed after retention already ran must not re-insert what it deleted.
    await pipeline.start()
    pipeline.submit(old[0])
    pipeline.submit(fresh := make_record(started_at=now - timedelta(days=1)))
    assert await pipeline.flush(timeout=30)
    await pipeline.stop(timeout=10)
    assert await rows(db_engine) == 1
    [letter] = dead_letters(tmp_path / "j")
    assert (letter["kind"], letter["event_id"]) == ("expired", old[0].event_id)
    assert metric(pipeline, "meter_journal_dead_lettered_total", reason="expired") == 1
    [totals] = await usage_summary(db_engine)
    assert totals["requests"] == 6 and fresh.event_id


def test_constructor_rejects_nonsense(tmp_path: Path) -> None:
    engine = create_engine("sqlite:///" + str(tmp_path / "x.db"))
    with Journal.open(tmp_path / "j") as journal:
        for bad in ({"batch_size": 0}, {"retention_days": 0}, {"concurrency": 0}, {"retry_initial": 0}):
            with pytest.raises(ValueError):
                Pipeline(journal, engine, registry=CollectorRegistry(), **bad)  # type: ignore[arg-type]
