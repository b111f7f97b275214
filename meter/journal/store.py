"""The durable local journal: where a usage record is written before it counts as written.

A journal is one directory owned by one process::

    DIR/LOCK                 flock'ed while a process owns DIR; holds "pid=... host=... since=..."
    DIR/checkpoint           {"segment": S, "offset": O}: everything before (S, O) is in the database
    DIR/00000001.seg ...     append-only segment files of frames (format: meter.journal.frames)
    DIR/dead-letter.jsonl    records the database refused (written by meter.pipeline.delivery)

Invariants (the modules named hold the code, and the details):

Rule 1: :meth:`Journal.append` is one ``os.write`` of a whole frame on an ``O_APPEND`` descriptor:
        the frame reaches the OS before append returns (it survives the process dying). A failed or
        short write is cut back off the file, so a frame is either wholly in a segment or not at all
        (meter.journal.segments). Durability against power loss comes from fsync: every ``fsync``
        seconds from a background thread when something was written, or inside every append with
        ``fsync="always"`` (meter.journal.sync).
Rule 2: frames are only ever appended to the newest segment. A segment rotates (a new file is
        started) when the next frame would take it past ``segment_bytes`` (meter.journal.segments).
Rule 3: the checkpoint only moves forward and is replaced atomically (tmp file, fsync, rename, fsync
        of the directory). Segments wholly before it are deleted; a crash between the two deletes
        them at the next open. If a power loss took a segment's unsynced tail while the checkpoint
        already pointed past it, open starts a new segment, so new frames never hide behind it
        (meter.journal.recovery).
Rule 4: :meth:`Journal.open` cuts an incomplete frame off the end of the newest segment (a crash mid
        write; meter.journal.reader, Rule 3), so appends after a restart continue on a frame boundary
        (meter.journal.recovery).
Rule 5: one process per directory: ``flock(LOCK_EX | LOCK_NB)`` on ``DIR/LOCK``. A second opener gets
        :class:`JournalLocked` naming the holder. The kernel releases the lock when the holder dies,
        so a restarted process adopts the journal of a dead one (:meth:`Journal.open_any`).
Rule 6: "pending" is the number of valid frames after the checkpoint: counted once at open
        (meter.journal.recovery), then kept up to date by append and commit.

Failure policy: append raises :class:`OSError` (disk full, I/O error), ``ValueError`` (a record over
16 MiB) or :class:`JournalClosed`; the caller decides (meter.pipeline.pump keeps the record in memory and
counts it). A failed background fsync is logged and kept in :attr:`Journal.sync_error` until one
succeeds (the pipeline reports not ready meanwhile).

Thread model: append, rotation and ``end`` belong to one thread (the event loop); readers,
:meth:`Journal.commit` and :meth:`Journal.close` may run in worker threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from meter.errors import JournalClosed, JournalError, JournalLocked
from meter.journal.frames import (
    CHECKPOINT_FILE,
    DEAD_LETTER_FILE,
    LOCK_FILE,
    MAX_PAYLOAD,
    Position,
    encode_frame,
    file_size,
    list_segments,
    read_lock_holder,
    segment_name,
)
from meter.journal.inspect import (  # read-only inspection, re-exported for one import path
    JournalStatus,
    default_journal_root,
    is_journal_directory,
    journal_directories,
    journal_status,
)
from meter.journal.payload import encode_record
from meter.journal.reader import CorruptFrame, Entry, JournalReader, ReadBatch, event_time
from meter.journal.recovery import recover
from meter.journal.segments import SegmentWriter
from meter.journal.sync import DEFAULT_FSYNC_INTERVAL, FsyncPolicy, GroupSync, fsync_dir
from meter.records import UsageRecord

__all__ = [
    "DEAD_LETTER_FILE",
    "CorruptFrame",
    "Entry",
    "FsyncPolicy",
    "Journal",
    "JournalReader",
    "JournalStats",
    "JournalStatus",
    "Position",
    "ReadBatch",
    "default_journal_root",
    "event_time",
    "is_journal_directory",
    "journal_directories",
    "journal_status",
]

logger = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
_LOCK_ATTEMPTS = 3  # journal_status probes the lock with a shared flock for microseconds
_LOCK_RETRY_S = 0.01


# -- the journal ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JournalStats:
    pending: int  # valid frames after the checkpoint
    pending_bytes: int  # segment bytes after the checkpoint (what an outage has piled up on disk)
    oldest_pending_at: float | None  # event_time() of the first pending record, epoch seconds
    appended: int  # since open
    committed: int  # since open
    segments: int
    sync_error: str | None  # the last background fsync failure, until an fsync succeeds again


class Journal:
    """An open, locked journal directory. Create with :meth:`open` or :meth:`open_any`."""

    def __init__(self, directory: Path, lock_fd: int, *, fsync: FsyncPolicy, segment_bytes: int) -> None:
        if fsync != "always" and not (isinstance(fsync, int | float) and fsync > 0):
            raise ValueError(f"fsync must be 'always' or a positive interval in seconds, got {fsync!r}")
        if segment_bytes < 4096:
            raise ValueError(f"segment_bytes must be at least 4096, got {segment_bytes}")
        self.directory = directory
        self._lock_fd = lock_fd
        self._segment_bytes = segment_bytes
        self._sync = GroupSync(directory, fsync)

        # Writer state: touched only by the appending thread (Rule 1, thread model). open() replaces
        # the writer with one that continues where recovery found the end.
        self._writer = SegmentWriter(directory, Position(1, 0), segment_bytes=segment_bytes, sync=self._sync)
        self._closed = False
        self._end = Position(1, 0)

        # Shared with commit (worker threads).
        self._commit_lock = threading.Lock()
        self._stats_lock = threading.Lock()

        self._checkpoint = Position(1, 0)
        self._pending = 0
        self._oldest: float | None = None
        self._appended = 0
        self._committed = 0
        self._disk_bytes = 0

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path | str,
        *,
        fsync: FsyncPolicy = DEFAULT_FSYNC_INTERVAL,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        create: bool = True,
    ) -> Journal:
        """Lock ``directory`` and recover its state (see Rules 3-6). Blocking: scans the pending part
        of the journal once, so call it via ``asyncio.to_thread`` from async code.

        Raises :class:`JournalLocked` if another process owns the directory, and
        ``FileNotFoundError`` if it does not exist and ``create`` is false.
        """
        path = Path(directory)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.is_dir():
            raise FileNotFoundError(f"no journal directory at {path}")
        lock_fd = _acquire_lock(path)
        try:
            journal = cls(path, lock_fd, fsync=fsync, segment_bytes=segment_bytes)
            journal._recover()
        except BaseException:
            os.close(lock_fd)
            raise
        journal._sync.start()
        return journal

    @classmethod
    def open_any(
        cls,
        root: Path | str,
        *,
        fsync: FsyncPolicy = DEFAULT_FSYNC_INTERVAL,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_directories: int = 1024,
    ) -> Journal:
        """Open the first unlocked subdirectory ``root/w0``, ``root/w1``, ... (creating the next one
        if all are held). Several workers sharing ``root`` each get their own journal, and a
        restarted worker adopts the journal a dead one left behind."""
        base = Path(root)
        base.mkdir(parents=True, exist_ok=True)
        for number in range(max_directories):
            try:
                return cls.open(base / f"w{number}", fsync=fsync, segment_bytes=segment_bytes)
            except JournalLocked:
                continue
        raise JournalError(f"all {max_directories} journal directories under {base} are locked")

    def _recover(self) -> None:
        """Take over what is on disk (Rules 3, 4 and 6; meter.journal.recovery)."""
        found = recover(self.directory, self._segment_bytes)
        self._checkpoint = found.checkpoint
        self._writer = SegmentWriter(
            self.directory, found.write_at, segment_bytes=self._segment_bytes, sync=self._sync
        )
        self._end = found.write_at
        self._pending = found.pending
        self._oldest = found.oldest_pending_at
        self._disk_bytes = found.disk_bytes

    # -- writing (one thread) ---------------------------------------------------------------------

    def append(self, record: UsageRecord) -> Position:
        """Write ``record`` as one frame and return the position after it (Rule 1).

        Raises :class:`JournalClosed`, ``ValueError`` for a record too large to journal, or
        ``OSError`` from the disk; after an error nothing of the record is in the journal.
        """
        if self._closed:
            raise JournalClosed(f"journal {self.directory} is closed")
        payload = encode_record(record)
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(
                f"usage record {record.event_id} encodes to {len(payload)} bytes; the limit is {MAX_PAYLOAD}"
            )
        frame = encode_frame(payload)
        fd, end = self._writer.write(frame)
        self._end = end
        with self._stats_lock:
            if self._pending <= 0:
                self._oldest = event_time(record)
            self._pending += 1
            self._appended += 1
            self._disk_bytes += len(frame)
        self._sync.appended(fd, end)
        return end

    @property
    def end(self) -> Position:
        """The position after the last appended frame (a live reader's ``limit``)."""
        return self._end

    @property
    def checkpoint(self) -> Position:
        return self._checkpoint

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def oldest_pending_at(self) -> float | None:
        return self._oldest

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def sync_error(self) -> str | None:
        """The last background fsync failure, until an fsync succeeds again."""
        return self._sync.error

    def stats(self) -> JournalStats:
        with self._stats_lock:
            return JournalStats(
                pending=self._pending,
                pending_bytes=max(0, self._disk_bytes - self._checkpoint.offset) if self._pending else 0,
                oldest_pending_at=self._oldest,
                appended=self._appended,
                committed=self._committed,
                segments=len(list_segments(self.directory)),
                sync_error=self.sync_error,
            )

    # -- durability (any thread) ------------------------------------------------------------------

    def sync(self) -> None:
        """fsync everything appended so far (and rotated segments, and new directory entries)."""
        self._sync.sync()

    # -- reading and consuming (any thread) --------------------------------------------------------

    def reader(self, start: Position | None = None) -> JournalReader:
        """A reader from ``start`` (default: the checkpoint). Pass ``limit=journal.end`` to its reads
        while this journal is being appended to."""
        return JournalReader(self.directory, start if start is not None else self._checkpoint)

    def commit(self, position: Position, frames: int) -> None:
        """Everything before ``position`` is consumed; ``frames`` valid frames were in that stretch.

        Writes the checkpoint atomically and deletes segments wholly before it (Rule 3). Blocking
        (two fsyncs); call it via ``asyncio.to_thread`` from async code.
        """
        with self._commit_lock:
            if self._closed:
                raise JournalClosed(f"journal {self.directory} is closed")
            if position < self._checkpoint:
                raise ValueError(f"checkpoint {position} is behind the current one {self._checkpoint}")
            checkpoint = position
            end = self._end
            if (
                position.segment < end.segment
                and file_size(self.directory / segment_name(position.segment)) <= position.offset
            ):
                checkpoint = Position(position.segment + 1, 0)  # that segment is done: drop it now
            _write_checkpoint(self.directory, checkpoint)
            self._checkpoint = checkpoint
            freed = 0
            for number in list_segments(self.directory):
                if number >= checkpoint.segment:
                    break
                path = self.directory / segment_name(number)
                freed += file_size(path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            with self._stats_lock:
                self._pending -= frames
                self._committed += frames
                self._disk_bytes -= freed
                if self._pending < 0:
                    logger.error(
                        "journal %s: pending count went negative (%d); resetting",
                        self.directory,
                        self._pending,
                    )
                    self._pending = 0
                if self._pending == 0:
                    self._oldest = None
                    return
            oldest = self._peek_oldest(checkpoint, end)
            with self._stats_lock:
                if self._pending > 0 and oldest is not None:
                    self._oldest = oldest

    def _peek_oldest(self, start: Position, limit: Position) -> float | None:
        with JournalReader(self.directory, start) as reader:
            for _ in range(100):  # skip a few corrupt frames at most; the metric is a best effort
                batch = reader.read(1, limit)
                if batch.entries:
                    return event_time(batch.entries[0].record)
                if not batch.frames and not batch.corrupt:
                    return None
        return None

    # -- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """fsync, close the files and release the lock. If everything was consumed the segments are
        deleted, so a cleanly stopped journal leaves only its checkpoint. Blocking; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sync.stop()
        with self._commit_lock:
            try:
                self.sync()
            except OSError as exc:
                logger.error("journal %s: final fsync failed: %s", self.directory, exc)
            self._writer.close()
            try:
                if self._pending == 0 and self._checkpoint >= self._end:
                    self._tidy()
            except OSError as exc:
                logger.warning("journal %s: could not remove consumed segments: %s", self.directory, exc)
            os.close(self._lock_fd)  # releases the flock

    def _tidy(self) -> None:
        segments = list_segments(self.directory)
        if not segments:
            return
        checkpoint = Position(max(segments[-1] + 1, self._checkpoint.segment), 0)
        _write_checkpoint(self.directory, checkpoint)
        self._checkpoint = checkpoint
        for number in segments:
            os.unlink(self.directory / segment_name(number))
        self._disk_bytes = 0

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Journal({str(self.directory)!r}, pending={self._pending}, end={self._end})"


# -- files ------------------------------------------------------------------------------------------


def _write_checkpoint(directory: Path, position: Position) -> None:
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    data = json.dumps({"segment": position.segment, "offset": position.offset}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / CHECKPOINT_FILE)
    fsync_dir(directory)


def _acquire_lock(directory: Path) -> int:
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        for attempt in range(_LOCK_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == _LOCK_ATTEMPTS - 1:
                    raise JournalLocked(directory, read_lock_holder(fd)) from None
                time.sleep(_LOCK_RETRY_S)
        since = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={since}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd
