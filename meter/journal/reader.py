"""Reading a journal: frames forward from a position, damage skipped and reported, the backlog.

Reader invariants (the format is :mod:`meter.journal.frames`; the writer's rules are in
:mod:`meter.journal.store`):
Rule 1: a position is ``(segment, offset)`` of the byte after a frame; a reader reports every frame
        it consumed and the position after it, so the consumer can commit exactly that.
Rule 2: given a ``limit`` (the writer's end, always a frame boundary) a reader never reads at or
        past it, so it never sees a frame being written.
Rule 3: without a limit (a journal nobody writes to, or one read from outside), an incomplete frame
        at the end of the newest segment stops the reader (a crash mid-write; the next open cuts it
        off); at the end of an older segment it is skipped and reported.
Rule 4: a frame whose length is implausible or whose CRC fails is skipped and reported as
        :class:`CorruptFrame`; the reader resynchronises on the next valid frame of the segment.

Not thread-safe; a reader belongs to one consumer, which may call it from a worker thread. Uses
``pread`` only, so it is safe against concurrent appends and segment deletion.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Literal

from meter.journal.frames import (
    HEADER,
    MAX_PAYLOAD,
    Position,
    list_segments,
    segment_name,
)
from meter.journal.payload import FALLBACK_MARK, decode_record
from meter.records import UsageRecord

logger = logging.getLogger(__name__)

ReadMode = Literal["records", "payloads", "count"]


@dataclass(frozen=True, slots=True)
class Entry:
    """A record read from the journal; ``position`` is just after its frame (what to commit)."""

    position: Position
    record: UsageRecord


@dataclass(frozen=True, slots=True)
class CorruptFrame:
    """Bytes a reader skipped: a frame whose CRC failed, or whose payload is not a usage record, or an
    incomplete frame at the end of an older segment. ``data`` is (up to 4 KiB of) what was skipped."""

    segment: int
    offset: int
    length: int
    reason: str
    data: bytes


@dataclass(slots=True)
class ReadBatch:
    """What one :meth:`JournalReader.read` consumed."""

    end: Position  # the reader's position after this batch: commit it once the batch is handled
    frames: int = 0  # valid frames consumed (whatever the mode): pass to commit
    entries: list[Entry] = field(default_factory=list)  # mode "records"
    payloads: list[bytes] = field(default_factory=list)  # mode "payloads"
    corrupt: list[CorruptFrame] = field(default_factory=list)  # skipped damage, and undecodable records


# -- reading ----------------------------------------------------------------------------------------


class JournalReader:
    """Reads frames forward from a position. Used on a live journal (with ``limit`` = the writer's
    end, so it never sees a frame being written) and on a cold one (status, replay, open).

    Not thread-safe; one reader belongs to one consumer, which may call it from a worker thread.
    """

    _CHUNK = 1024 * 1024

    def __init__(self, directory: Path, start: Position) -> None:
        self.directory = directory
        self.position = start
        self._fd: int | None = None
        self._fd_segment = -1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._fd_segment = -1

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Entry]:
        """Every record from here to the current end (damage is skipped silently here; use
        :meth:`read` to see it)."""
        while True:
            batch = self.read(1000)
            yield from batch.entries
            if not batch.frames and not batch.corrupt:
                return

    def read(
        self, max_records: int, limit: Position | None = None, *, mode: ReadMode = "records"
    ) -> ReadBatch:
        """Up to ``max_records`` frames from the current position, never reading at or past ``limit``.

        ``mode`` says what to return: ``"records"`` decodes each payload into an :class:`Entry`
        (a payload that is not a record is reported in ``corrupt``), ``"payloads"`` returns the
        payloads undecoded, ``"count"`` only CRC-checks and counts them.
        """
        batch = ReadBatch(self.position)
        entries, payloads, corrupt = batch.entries, batch.payloads, batch.corrupt
        frames = 0
        chunk = self._CHUNK if max_records > 64 else 64 * 1024
        need = 0  # a frame bigger than the chunk: read at least this much next time
        while frames < max_records:
            if limit is not None and self.position >= limit:
                break
            segment, offset = self.position.segment, self.position.offset
            fd = self._open(segment)
            if fd is None:  # consumed and deleted, or never created: go on to the next segment
                if not self._advance_segment(limit):
                    break
                continue
            stop = limit.offset if limit is not None and limit.segment == segment else None
            want = max(chunk, need)
            if stop is not None:
                want = min(want, stop - offset)
            buf = os.pread(fd, want, offset)
            # True when buf holds everything there is to read right now (EOF, or up to the limit).
            complete = len(buf) < want or (stop is not None and offset + len(buf) >= stop)
            need = 0
            pos = 0
            status = "full"
            while frames < max_records:
                if pos == len(buf):
                    status = "end" if complete else "refill"
                    break
                if pos + 8 > len(buf):
                    status = "partial" if complete else "refill"
                    break
                length, crc = HEADER.unpack_from(buf, pos)
                if not 0 < length <= MAX_PAYLOAD:
                    status = "damage"
                    break
                if pos + 8 + length > len(buf):
                    if complete:
                        status = "partial"
                    else:
                        status, need = "refill", 8 + length
                    break
                payload = buf[pos + 8 : pos + 8 + length]
                if zlib.crc32(payload, zlib.crc32(buf[pos : pos + 4])) != crc:
                    status = "damage"
                    break
                frame_start = offset + pos
                pos += 8 + length
                frames += 1
                self.position = Position(segment, offset + pos)
                if mode == "payloads":
                    payloads.append(payload)
                elif mode == "records":
                    try:
                        entries.append(Entry(self.position, decode_record(payload)))
                    except (ValueError, TypeError) as exc:
                        corrupt.append(
                            CorruptFrame(
                                segment, frame_start, 8 + length, f"undecodable: {exc}", payload[:4096]
                            )
                        )
            if status in ("full", "refill"):
                continue
            if status == "end":
                if stop is not None or not self._advance_segment(limit):
                    break
                continue
            if not self._skip_damage(fd, corrupt, limit):  # "partial" or "damage"
                break
        batch.end, batch.frames = self.position, frames
        return batch

    # -- internals ------------------------------------------------------------------------------

    def _open(self, segment: int) -> int | None:
        if self._fd_segment == segment and self._fd is not None:
            return self._fd
        self.close()
        try:
            self._fd = os.open(self.directory / segment_name(segment), os.O_RDONLY)
        except FileNotFoundError:
            return None
        self._fd_segment = segment
        return self._fd

    def _later_segment(self) -> int | None:
        later = [n for n in list_segments(self.directory) if n > self.position.segment]
        return later[0] if later else None

    def _advance_segment(self, limit: Position | None) -> bool:
        """Move to the start of the next existing segment; False if there is none within ``limit``."""
        nxt = self._later_segment()
        if nxt is None or (limit is not None and nxt > limit.segment):
            return False
        self.position = Position(nxt, 0)
        return True

    def _skip_damage(self, fd: int, corrupt: list[CorruptFrame], limit: Position | None) -> bool:
        """At the current position is a frame that is incomplete or fails its CRC. Skip to the next
        valid frame of this segment, reporting what was skipped. If there is none, the rest of the
        segment is a torn tail: stop before it in the newest segment of a cold journal (Rule 4),
        otherwise skip to the limit or to the next segment. Returns True if the reader moved."""
        segment, offset = self.position.segment, self.position.offset
        stop = limit.offset if limit is not None and limit.segment == segment else None
        size = os.fstat(fd).st_size if stop is None else min(stop, os.fstat(fd).st_size)
        rest = os.pread(fd, max(0, size - offset), offset)
        found = _resync(rest)
        if found is not None:
            corrupt.append(
                CorruptFrame(segment, offset, found, _damage_reason(rest), rest[: min(found, 4096)])
            )
            self.position = Position(segment, offset + found)
            return True
        if stop is not None:
            # A live journal's limit is a frame boundary the writer vouches for: all of it is damage.
            corrupt.append(CorruptFrame(segment, offset, stop - offset, _damage_reason(rest), rest[:4096]))
            self.position = Position(segment, stop)
            return True
        nxt = self._later_segment()
        if nxt is None or (limit is not None and nxt > limit.segment):
            return False
        if rest:
            reason = "incomplete frame at the end of a segment" if _looks_torn(rest) else _damage_reason(rest)
            corrupt.append(CorruptFrame(segment, offset, len(rest), reason, rest[:4096]))
        self.position = Position(nxt, 0)
        return True


def _looks_torn(data: bytes) -> bool:
    if len(data) < 8:
        return True
    length: int = HEADER.unpack_from(data, 0)[0]
    return 0 < length <= MAX_PAYLOAD and 8 + length > len(data)


def _damage_reason(data: bytes) -> str:
    if len(data) >= 8:
        length, _ = HEADER.unpack_from(data, 0)
        if not 0 < length <= MAX_PAYLOAD:
            return f"corrupt frame header (length {length})"
        return "frame checksum mismatch"
    return "corrupt frame"


def _resync(data: bytes) -> int | None:
    """Offset (> 0) of the first valid frame in ``data`` after its start, or None. Candidates are
    found by the payload's first byte, so a long run of garbage costs a few ``find`` calls."""
    candidates: list[int] = []
    for mark in (b"{", FALLBACK_MARK):
        idx = data.find(mark, 9)
        while idx != -1:
            candidates.append(idx - 8)
            idx = data.find(mark, idx + 1)
    for start in sorted(candidates):
        length, crc = HEADER.unpack_from(data, start)
        if not 0 < length <= MAX_PAYLOAD or start + 8 + length > len(data):
            continue
        payload = data[start + 8 : start + 8 + length]
        if zlib.crc32(payload, zlib.crc32(data[start : start + 4])) == crc:
            return start
    return None


# -- the backlog --------------------------------------------------------------------------------------


def event_time(record: UsageRecord) -> float:
    """When the record's request ended (epoch seconds): ``started_at`` plus its duration. Records are
    journaled when their request ends, so this is what "age of the oldest pending event" measures."""
    started = record.started_at
    started = started.replace(tzinfo=UTC) if started.tzinfo is None else started
    return started.timestamp() + (record.duration_ms or 0.0) / 1000.0


@dataclass(frozen=True, slots=True)
class Backlog:
    """What lies between a reader's position and the end of the journal."""

    frames: int  # valid frames
    corrupt: int  # corrupt stretches skipped
    oldest: float | None  # event_time() of the first record, None if there is none
    end: Position  # where the last valid frame ends


def scan_backlog(reader: JournalReader) -> Backlog:
    """Read ``reader`` to the end: the first record decoded (for its event time), every other frame
    only CRC-checked and counted. Proportional to the backlog."""
    frames, corrupt, oldest = 0, 0, None
    while oldest is None:
        batch = reader.read(1)
        frames += batch.frames
        corrupt += len(batch.corrupt)
        if batch.entries:
            oldest = event_time(batch.entries[0].record)
        elif not batch.frames and not batch.corrupt:
            break
    while True:
        batch = reader.read(100_000, mode="count")
        frames += batch.frames
        corrupt += len(batch.corrupt)
        if not batch.frames and not batch.corrupt:
            break
    return Backlog(frames, corrupt, oldest, reader.position)
