"""The journal on a real filesystem: the frame format byte for byte, every field round-tripping,
crash damage (torn tails, corrupt frames), checkpoints, rotation, and exclusive ownership across
processes. No database is involved."""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from meter.errors import JournalClosed, JournalLocked
from meter.journal.frames import Position, segment_name
from meter.journal.payload import decode_record, encode_record
from meter.journal.store import Journal, journal_status
from meter.journal.sync import parse_fsync_policy
from meter.records import Outcome, UsageRecord, UsageSource
from tests.conftest_db import every_field_record, make_record
from tests.support.paths import ROOT

EVERY_FIELD = every_field_record()


def records(count: int, **overrides: object) -> list[UsageRecord]:
    return [make_record(prompt_tokens=i, **overrides) for i in range(count)]


def read_all(journal: Journal) -> list[UsageRecord]:
    with journal.reader() as reader:
        return [entry.record for entry in reader]


def segment_path(directory: Path, number: int = 1) -> Path:
    return directory / segment_name(number)


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def journal(journal_dir: Path) -> Iterator[Journal]:
    with Journal.open(journal_dir) as opened:
        yield opened


# -- format ---------------------------------------------------------------------------------------


def test_a_frame_is_length_crc_payload_and_the_payload_is_the_records_json(journal: Journal) -> None:
    end = journal.append(EVERY_FIELD)
    data = segment_path(journal.directory).read_bytes()
    length, crc = struct.unpack_from("<II", data)
    payload = data[8:]
    assert length == len(payload) and end == Position(1, 8 + length)
    assert crc == zlib.crc32(payload, zlib.crc32(data[:4]))  # the CRC covers the length too
    assert payload == orjson.dumps(EVERY_FIELD)
    assert orjson.loads(payload)["outcome"] == "aborted"
    assert orjson.loads(payload)["started_at"] == "2024-05-01T23:30:15.123456-02:00"


@pytest.mark.parametrize(
    "record",
    [
        EVERY_FIELD,
        make_record(),  # defaults: None counts, empty metrics
        make_record(started_at=datetime(2024, 5, 1, 12, 0)),  # naive stays naive
        make_record(started_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC), team="", requested_model=""),
    ],
    ids=["every-field", "defaults", "naive-time", "empty-strings"],
)
def test_every_field_round_trips_through_the_journal(journal_dir: Path, record: UsageRecord) -> None:
    with Journal.open(journal_dir) as journal:
        journal.append(record)
    with Journal.open(journal_dir) as journal:  # from disk, not from memory
        [back] = read_all(journal)
    assert back == record
    assert back.started_at.utcoffset() == record.started_at.utcoffset()
    assert type(back.outcome) is Outcome and type(back.usage_source) is UsageSource
    assert {name: type(getattr(back, name)) for name in UsageRecord.__dataclass_fields__} == {
        name: type(getattr(record, name)) for name in UsageRecord.__dataclass_fields__
    }


def test_records_orjson_cannot_encode_still_round_trip_exactly() -> None:
    record = make_record(prompt_tokens=2**70, error="lone \ud800 surrogate", upstream_metrics={"x": math.inf})
    payload = encode_record(record)
    assert payload[:1] == b"\x01"  # the standard-library fallback, marked
    back = decode_record(payload)
    assert back.prompt_tokens == 2**70 and back.error == record.error
    assert back.upstream_metrics == {"x": math.inf}


def test_non_finite_floats_become_null_in_an_orjson_payload() -> None:
    back = decode_record(encode_record(make_record(duration_ms=math.nan, upstream_metrics={"a": math.nan})))
    assert back.duration_ms is None and back.upstream_metrics == {"a": None}


def test_unknown_keys_and_enum_values_from_a_newer_meter_are_tolerated() -> None:
    data = json.loads(encode_record(make_record()))
    data["new_field"] = 1
    data["outcome"] = "some_future_outcome"
    back = decode_record(json.dumps(data).encode())
    assert back.outcome == "some_future_outcome"
    with pytest.raises(ValueError, match="lacks endpoint, event_id"):
        decode_record(json.dumps({"started_at": "2024-01-01T00:00:00"}).encode())


# -- crash damage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["mid-payload", "mid-header"])
def test_a_torn_tail_stops_the_reader_and_appends_continue_after_reopen(journal_dir: Path, cut: str) -> None:
    written = records(10)
    with Journal.open(journal_dir) as journal:
        for record in written:
            journal.append(record)
        last_end = journal.end.offset
    path = segment_path(journal_dir)
    if cut == "mid-payload":
        os.truncate(path, last_end - 5)  # the crash hit while the 10th frame was being written
        survivors = written[:9]
    else:
        with open(path, "ab") as handle:
            handle.write(b"\x10\x00\x00")  # three bytes of an 11th frame's header
        survivors = written

    [status] = journal_status(journal_dir)  # read-only: stops at the tail, reports no corruption
    assert (status.pending_events, status.corrupt_frames) == (len(survivors), 0)

    with Journal.open(journal_dir) as journal:
        assert journal.pending == len(survivors)
        with journal.reader() as reader:
            batch = reader.read(100)
        assert [e.record for e in batch.entries] == survivors and batch.corrupt == []
        more = records(2, team="after-crash")
        for record in more:
            journal.append(record)
        assert read_all(journal) == survivors + more
    assert path.stat().st_size == journal.end.offset  # the tail was cut off, nothing left between


def test_a_corrupt_frame_is_skipped_reported_and_the_rest_is_read(journal_dir: Path) -> None:
    written = records(5)
    with Journal.open(journal_dir) as journal:
        ends = [journal.append(record).offset for record in written]
    path = segment_path(journal_dir)
    data = bytearray(path.read_bytes())
    data[ends[1] + 20] ^= 0xFF  # flip a payload byte of the third frame
    path.write_bytes(bytes(data))

    [status] = journal_status(journal_dir)
    assert (status.pending_events, status.corrupt_frames) == (4, 1)
    with Journal.open(journal_dir) as journal:
        assert journal.pending == 4
        with journal.reader() as reader:
            batch = reader.read(100)
    assert [e.record for e in batch.entries] == [written[0], written[1], written[3], written[4]]
    [bad] = batch.corrupt
    assert (bad.segment, bad.offset, bad.length) == (1, ends[1], ends[2] - ends[1])
    assert bad.reason == "frame checksum mismatch"


def test_a_corrupt_length_is_caught_by_the_crc_and_the_reader_resynchronises(journal_dir: Path) -> None:
    written = records(4)
    with Journal.open(journal_dir) as journal:
        ends = [journal.append(record).offset for record in written]
    path = segment_path(journal_dir)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, ends[0], 300)  # a plausible but wrong length for the second frame
    path.write_bytes(bytes(data))
    with Journal.open(journal_dir) as journal, journal.reader() as reader:
        batch = reader.read(100)
    assert [e.record for e in batch.entries] == [written[0], written[2], written[3]]
    assert [(c.offset, c.length) for c in batch.corrupt] == [(ends[0], ends[1] - ends[0])]


def test_a_failed_write_is_cut_back_and_leaves_no_damage(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal.append(make_record(team="before"))
    size = segment_path(journal.directory).stat().st_size
    real_write = os.write

    def disk_full(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])  # half the frame reaches the file, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        journal.append(make_record(team="lost"))
    monkeypatch.setattr(os, "write", real_write)
    assert segment_path(journal.directory).stat().st_size == size
    journal.append(make_record(team="after"))
    assert [r.team for r in read_all(journal)] == ["before", "after"]
    assert journal.pending == 2


# -- checkpoint, segments, rotation --------------------------------------------------------------


def test_segments_rotate_by_size_and_the_reader_crosses_them_in_order(journal_dir: Path) -> None:
    written = records(40)
    with Journal.open(journal_dir, segment_bytes=4096) as journal:
        for record in written:
            journal.append(record)
        sizes = [segment_path(journal_dir, n).stat().st_size for n in range(1, journal.end.segment + 1)]
        assert len(sizes) >= 5 and all(size <= 4096 for size in sizes)
        assert read_all(journal) == written


def test_commit_is_durable_across_reopen_and_deletes_consumed_segments(journal_dir: Path) -> None:
    written = records(40)
    with Journal.open(journal_dir, segment_bytes=4096) as journal:
        for record in written:
            journal.append(record)
        with journal.reader() as reader:
            batch = reader.read(25, journal.end)
        journal.commit(batch.end, batch.frames)
        assert journal.pending == 15
        # Segments wholly before the checkpoint are gone (if the batch ended exactly at the end of
        # a segment, the checkpoint moved on to the start of the next one and that went too).
        checkpoint = journal.checkpoint
        assert checkpoint in (batch.end, Position(batch.end.segment + 1, 0))
        assert min(int(p.stem) for p in journal_dir.glob("*.seg")) == checkpoint.segment
        assert journal.oldest_pending_at is not None

    with Journal.open(journal_dir, segment_bytes=4096) as journal:  # a restart
        assert journal.checkpoint == checkpoint and journal.pending == 15
        assert read_all(journal) == written[25:]
        with journal.reader() as reader:
            rest = reader.read(100, journal.end)
        journal.commit(rest.end, rest.frames)
        assert (journal.pending, journal.oldest_pending_at) == (0, None)
    # Everything consumed: a clean close leaves no segments behind.
    assert sorted(p.name for p in journal_dir.iterdir()) == ["LOCK", "checkpoint"]

    with Journal.open(journal_dir) as journal:
        assert journal.pending == 0 and read_all(journal) == []
        journal.append(make_record(team="next"))
        assert [r.team for r in read_all(journal)] == ["next"]


def test_commit_refuses_to_move_backwards(journal: Journal) -> None:
    journal.append(make_record())
    with journal.reader() as reader:
        batch = reader.read(10, journal.end)
    journal.commit(batch.end, batch.frames)
    with pytest.raises(ValueError, match="behind"):
        journal.commit(Position(1, 0), 0)


def test_a_checkpoint_past_the_end_of_its_segment_starts_a_new_segment(journal_dir: Path) -> None:
    # A power loss kept the (fsynced) checkpoint but not the segment's unsynced tail.
    with Journal.open(journal_dir) as journal:
        for record in records(3):
            journal.append(record)
    (journal_dir / "checkpoint").write_text(json.dumps({"segment": 1, "offset": 10_000}))
    with Journal.open(journal_dir) as journal:
        assert journal.pending == 0
        journal.append(make_record(team="new"))
        assert journal.end.segment == 2
        assert [r.team for r in read_all(journal)] == ["new"]


def test_a_live_reader_never_reads_past_the_limit(journal: Journal) -> None:
    journal.append(make_record(team="done"))
    limit = journal.end
    with open(segment_path(journal.directory), "ab") as handle:
        handle.write(b"\x00\x02\x00\x00\x12\x34")  # a frame "being written" by someone
    with journal.reader() as reader:
        batch = reader.read(10, limit)
        assert [e.record.team for e in batch.entries] == ["done"] and batch.corrupt == []
        assert reader.read(10, limit).frames == 0


def test_append_after_close_raises(journal_dir: Path) -> None:
    journal = Journal.open(journal_dir)
    journal.close()
    with pytest.raises(JournalClosed):
        journal.append(make_record())


@pytest.mark.parametrize("policy", ["always", 0.01])
def test_fsync_policies_both_keep_every_record(journal_dir: Path, policy: str | float) -> None:
    with Journal.open(journal_dir, fsync=policy, segment_bytes=4096) as journal:  # type: ignore[arg-type]
        for record in records(30):
            journal.append(record)
        journal.sync()
        assert journal.sync_error is None
    with Journal.open(journal_dir) as journal:
        assert journal.pending == 30


def test_parse_fsync_policy() -> None:
    assert parse_fsync_policy("always") == "always"
    assert parse_fsync_policy("250") == 0.25
    for bad in ("0", "-5", "sometimes"):
        with pytest.raises(ValueError):
            parse_fsync_policy(bad)


# -- ownership ------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from meter.journal.store import Journal
    journal = Journal.open(sys.argv[1]) if sys.argv[2] == "open" else Journal.open_any(sys.argv[1])
    print(journal.directory, flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def hold() -> Iterator[object]:
    """Start a process that owns a journal until the test ends (flock is per open file, and a real
    second process is what production has)."""
    processes: list[subprocess.Popen[str]] = []

    def start(path: Path, how: str = "open") -> tuple[subprocess.Popen[str], Path]:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), how],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        processes.append(process)
        assert process.stdout is not None
        owned = Path(process.stdout.readline().strip())  # printed once the lock is held
        return process, owned

    yield start
    for process in processes:
        if process.poll() is None:
            assert process.stdin is not None
            process.stdin.close()
            process.wait(timeout=10)


def test_a_second_process_gets_a_clear_error_naming_the_holder(journal_dir: Path, hold: object) -> None:
    process, _ = hold(journal_dir)  # type: ignore[operator]
    with pytest.raises(JournalLocked) as caught:
        Journal.open(journal_dir)
    message = str(caught.value)
    assert f"pid={process.pid}" in message and str(journal_dir) in message
    assert "METER_JOURNAL_DIR" in message
    [status] = journal_status(journal_dir)
    assert status.locked and f"pid={process.pid}" in (status.holder or "")

    process.stdin.close()  # the holder dies: its lock goes with it
    process.wait(timeout=10)
    assert not journal_status(journal_dir)[0].locked
    with Journal.open(journal_dir) as adopted:  # a restarted process takes over the directory
        assert journal_status(journal_dir)[0].locked and adopted.pending == 0


def test_the_same_directory_cannot_be_opened_twice_in_one_process(journal: Journal) -> None:
    with pytest.raises(JournalLocked, match=f"pid={os.getpid()}"):
        Journal.open(journal.directory)


def test_open_any_claims_the_first_free_worker_directory(tmp_path: Path, hold: object) -> None:
    root = tmp_path / "journals"
    _, held = hold(root, "open_any")  # type: ignore[operator]
    assert held == root / "w0"
    with Journal.open_any(root) as second:
        assert second.directory == root / "w1"
        with Journal.open_any(root) as third:
            assert third.directory == root / "w2"
    # w1 was left behind with records: the next worker to start adopts it.
    with Journal.open(root / "w1") as orphan:
        orphan.append(make_record(team="orphaned"))
    with Journal.open_any(root) as adopter:
        assert adopter.directory == root / "w1"
        assert adopter.pending == 1 and read_all(adopter)[0].team == "orphaned"


def test_journal_status_reports_each_worker_directory(tmp_path: Path) -> None:
    root = tmp_path / "journals"
    started = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    with Journal.open(root / "w0") as w0:
        for record in records(3, started_at=started, duration_ms=1500.0):
            w0.append(record)
        (root / "w0" / "dead-letter.jsonl").write_text('{"kind":"rejected"}\n{"kind":"corrupt"}\n')
        with Journal.open(root / "w1"):
            statuses = journal_status(root)
    assert [s.directory.name for s in statuses] == ["w0", "w1"]
    w0_status, w1_status = statuses
    assert w0_status.locked and w1_status.locked
    assert w0_status.pending_events == 3 and w0_status.pending_bytes > 0
    assert w0_status.oldest_pending_at == started + timedelta(seconds=1.5)  # when the request ended
    assert w0_status.dead_lettered == 2
    assert w1_status.pending_events == 0
    assert not any(s.locked for s in journal_status(root))
