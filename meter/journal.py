"""The durable local journal: where a usage record is written before it counts as written.

A journal is one directory owned by one process::

    DIR/LOCK                 flock'ed while a process owns DIR; holds "pid=... host=... since=..."
    DIR/checkpoint           {"segment": S, "offset": O}: everything before (S, O) is in the database
    DIR/00000001.seg ...     append-only segment files of frames (format: meter.frames)
    DIR/dead-letter.jsonl    records the database refused (written by meter.pipeline)

Invariants:

Rule 1: :meth:`Journal.append` is one ``os.write`` of a whole frame on an ``O_APPEND`` descriptor:
        the frame reaches the OS before append returns (it survives the process dying). Durability
        against power loss comes from fsync: every ``fsync`` seconds from a background thread when
        something was written, or inside every append with ``fsync="always"``. A failed or short
        write is cut back off the file, so a frame is either wholly in a segment or not at all.
Rule 2: frames are only ever appended to the newest segment. A segment rotates (a new file is
        started) when the next frame would take it past ``segment_bytes``.
Rule 3: the checkpoint only moves forward and is replaced atomically (tmp file, fsync, rename, fsync
        of the directory). Segments wholly before it are deleted; a crash between the two deletes
        them at the next open. If a power loss took a segment's unsynced tail while the checkpoint
        already pointed past it, open starts a new segment, so new frames never hide behind it.
Rule 4: :meth:`Journal.open` cuts an incomplete frame off the end of the newest segment (a crash mid
        write; meter.frames, Rule 3), so appends after a restart continue on a frame boundary.
Rule 5: one process per directory: ``flock(LOCK_EX | LOCK_NB)`` on ``DIR/LOCK``. A second opener gets
        :class:`JournalLocked` naming the holder. The kernel releases the lock when the holder dies,
        so a restarted process adopts the journal of a dead one (:meth:`Journal.open_any`).
Rule 6: "pending" is the number of valid frames after the checkpoint: counted once at open, then
        kept up to date by append and commit.

Failure policy: append raises :class:`OSError` (disk full, I/O error), ``ValueError`` (a record over
16 MiB) or :class:`JournalClosed`; the caller decides (meter.pipeline keeps the record in memory and
counts it). A failed background fsync is logged and kept in :attr:`Journal.sync_error` until one
succeeds (the pipeline reports not ready meanwhile).

Thread model: append, rotation and ``end`` belong to one thread (the event loop); readers,
:meth:`Journal.commit` and :meth:`Journal.close` may run in worker threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
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
from typing import Literal

from meter.frames import (
    CHECKPOINT_FILE,
    DEAD_LETTER_FILE,
    LOCK_FILE,
    MAX_PAYLOAD,
    CorruptFrame,
    Entry,
    JournalReader,
    Position,
    ReadBatch,
    encode_frame,
    event_time,
    file_size,
    list_segments,
    read_checkpoint,
    read_lock_holder,
    segment_name,
)
from meter.journal_inspect import (  # read-only inspection, re-exported for one import path
    JournalStatus,
    default_journal_root,
    is_journal_directory,
    journal_directories,
    journal_status,
)
from meter.payload import encode_record
from meter.records import UsageRecord

__all__ = [
    "DEAD_LETTER_FILE",
    "CorruptFrame",
    "Entry",
    "FsyncPolicy",
    "Journal",
    "JournalClosed",
    "JournalError",
    "JournalLocked",
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
    "parse_fsync_policy",
]

logger = logging.getLogger(__name__)

FsyncPolicy = float | Literal["always"]  # seconds between group fsyncs, or fsync inside every append

DEFAULT_FSYNC_INTERVAL = 0.1
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
_LOCK_ATTEMPTS = 3  # journal_status probes the lock with a shared flock for microseconds
_LOCK_RETRY_S = 0.01


def parse_fsync_policy(value: str) -> FsyncPolicy:
    """A setting's text (``"always"`` or a number of milliseconds > 0) as a :data:`FsyncPolicy`."""
    text = value.strip().lower()
    if text == "always":
        return "always"
    try:
        millis = float(text)
    except ValueError:
        raise ValueError("expected 'always' or an interval in milliseconds") from None
    if not millis > 0:
        raise ValueError("the fsync interval must be a positive number of milliseconds")
    return millis / 1000.0


class JournalError(Exception):
    """Base of the journal's own errors."""


class JournalLocked(JournalError):
    """Another process owns the journal directory."""

    def __init__(self, directory: Path, holder: str | None) -> None:
        self.directory = directory
        self.holder = holder
        who = f"another meter process ({holder})" if holder else "another meter process"
        super().__init__(
            f"journal directory {directory} is locked by {who}. Each meter process needs a journal "
            "directory of its own: give every replica its own METER_JOURNAL_DIR, or point workers at a "
            "shared root and let each claim a subdirectory (w0, w1, ...)."
        )


class JournalClosed(JournalError):
    """The journal was closed; nothing more can be appended."""


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
        self._always = fsync == "always"
        self._interval = 0.0 if fsync == "always" else float(fsync)
        self._segment_bytes = segment_bytes

        # Writer state: touched only by the appending thread (Rule 1, thread model).
        self._seg = 1
        self._off = 0
        self._fd: int | None = None
        self._broken = False  # a failed write could not be cut back: start a new segment
        self._closed = False
        self._end = Position(1, 0)
        self._tail: tuple[int, Position] | None = None  # (fd, end) of the last append, for fsync

        # Shared with the fsync thread and commit (worker threads).
        self._retired: collections.deque[int] = collections.deque()  # rotated fds, closed after fsync
        self._dirty = False
        self._dir_dirty = False
        self._sync_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stop_sync = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self.sync_error: str | None = None

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
        if not journal._always:
            journal._sync_thread = threading.Thread(
                target=journal._sync_loop, name=f"meter-journal-fsync:{path.name}", daemon=True
            )
            journal._sync_thread.start()
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
        directory = self.directory
        segments = list_segments(directory)
        checkpoint = read_checkpoint(directory)
        if checkpoint is None:
            checkpoint = Position(segments[0] if segments else 1, 0)
        for number in segments:
            if number < checkpoint.segment:  # consumed; a crash came between checkpoint and unlink
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / segment_name(number))
        segments = [n for n in segments if n >= checkpoint.segment]
        self._checkpoint = checkpoint

        pending, oldest = 0, None
        with JournalReader(directory, checkpoint) as reader:
            while oldest is None:
                batch = reader.read(1)
                pending += batch.frames
                if batch.entries:
                    oldest = event_time(batch.entries[0].record)
                elif not batch.frames and not batch.corrupt:
                    break
            while True:
                batch = reader.read(100_000, mode="count")
                pending += batch.frames
                if not batch.frames and not batch.corrupt:
                    break
            end = reader.position

        write_seg, write_off = checkpoint.segment, 0
        if segments:
            last = segments[-1]
            path = directory / segment_name(last)
            size = path.stat().st_size
            if end.segment == last and end.offset < size:
                # Rule 4: an incomplete frame from a crash mid-write; cut it off.
                logger.warning(
                    "journal %s: cutting %d bytes of an incomplete frame off the end of %s",
                    directory,
                    size - end.offset,
                    path.name,
                )
                with open(path, "r+b") as handle:
                    handle.truncate(end.offset)
                    os.fsync(handle.fileno())
                size = end.offset
            if end.segment == last and end.offset == size and size < self._segment_bytes:
                write_seg, write_off = last, size  # continue the newest segment
            else:
                # Full, or shorter than the checkpoint says (its tail was lost with the power).
                write_seg = last + 1
        if Position(write_seg, write_off) < checkpoint:
            write_seg, write_off = checkpoint.segment + 1, 0
        self._seg, self._off = write_seg, write_off
        self._end = Position(write_seg, write_off)
        self._pending = pending
        self._oldest = oldest
        self._disk_bytes = sum(file_size(directory / segment_name(n)) for n in segments)

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
        fd = self._fd
        if fd is None or self._broken or (self._off > 0 and self._off + len(frame) > self._segment_bytes):
            fd = self._roll()
        try:
            written = os.write(fd, frame)
        except OSError:
            self._cut_back(fd)
            raise
        if written != len(frame):
            self._cut_back(fd)
            raise OSError(errno.ENOSPC, f"short write to journal segment {segment_name(self._seg)}")
        self._off += written
        end = Position(self._seg, self._off)
        self._end = end
        self._tail = (fd, end)
        with self._stats_lock:
            if self._pending <= 0:
                self._oldest = event_time(record)
            self._pending += 1
            self._appended += 1
            self._disk_bytes += written
        if self._always:
            os.fsync(fd)
        else:
            self._dirty = True
        return end

    def _roll(self) -> int:
        """Open the write segment: the current one on first use, else the next one (Rule 2)."""
        if self._fd is not None:
            self._retired.append(self._fd)  # fsynced and closed by the next sync pass
            self._fd = None
            self._seg += 1
            self._off = 0
            self._broken = False
        fd = os.open(
            self.directory / segment_name(self._seg),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o644,
        )
        self._fd = fd
        if self._always:
            _fsync_dir(self.directory)
        else:
            self._dir_dirty = True
        return fd

    def _cut_back(self, fd: int) -> None:
        try:
            os.ftruncate(fd, self._off)
        except OSError as exc:
            logger.error(
                "journal %s: cannot cut a failed write back (%s); starting a new segment", self.directory, exc
            )
            self._broken = True

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
        with self._sync_lock:
            tail = self._tail
            self._dirty = False
            keep: list[int] = []
            while self._retired:
                fd = self._retired.popleft()
                os.fsync(fd)
                if tail is not None and fd == tail[0]:
                    keep.append(fd)  # the appender has not yet moved its tail to the new segment
                else:
                    os.close(fd)
            self._retired.extendleft(keep)
            if self._dir_dirty:
                self._dir_dirty = False
                _fsync_dir(self.directory)
            if tail is not None:
                os.fsync(tail[0])  # never closed while it is the tail (see above)

    def _sync_loop(self) -> None:
        while not self._stop_sync.wait(self._interval):
            if not (self._dirty or self._retired or self._dir_dirty):
                continue
            try:
                self.sync()
            except OSError as exc:
                self.sync_error = f"fsync failed: {exc}"
                logger.error("journal %s: %s", self.directory, self.sync_error)
            else:
                self.sync_error = None

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
        self._stop_sync.set()
        if self._sync_thread is not None:
            self._sync_thread.join()
        with self._commit_lock:
            try:
                self.sync()
            except OSError as exc:
                logger.error("journal %s: final fsync failed: %s", self.directory, exc)
            with self._sync_lock:
                for fd in {*self._retired, *([self._fd] if self._fd is not None else [])}:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._retired.clear()
                self._fd = None
                self._tail = None
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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    _fsync_dir(directory)


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
