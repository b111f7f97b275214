"""Read-only inspection of journal directories: what ``meter journal status`` shows.

Nothing here takes a journal's lock or writes to it, so it is safe to run beside the process that
owns the journal; the numbers of a live journal are a snapshot. Each call scans the pending part of
every journal once (proportional to the backlog).
"""

from __future__ import annotations

import fcntl
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from meter.journal.frames import (
    CHECKPOINT_FILE,
    DEAD_LETTER_FILE,
    LOCK_FILE,
    Position,
    file_size,
    list_segments,
    read_checkpoint,
    read_lock_holder,
    segment_name,
)
from meter.journal.reader import JournalReader, scan_backlog

_WORKER_RE = re.compile(r"^w(\d+)$")


def _probe_lock(directory: Path) -> tuple[bool, str | None]:
    """(locked, holder) without taking the journal: a shared flock held for an instant."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, read_lock_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, read_lock_holder(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class JournalStatus:
    directory: Path
    locked: bool  # a live process owns it (then its numbers are a moment's snapshot)
    holder: str | None  # "pid=... host=... since=..." of the last owner
    pending_events: int
    pending_bytes: int
    oldest_pending_at: datetime | None
    segments: int
    corrupt_frames: int  # damaged stretches between the checkpoint and the end
    dead_lettered: int  # lines in the dead-letter file
    checkpoint: Position | None


def is_journal_directory(path: Path) -> bool:
    return path.is_dir() and (
        (path / LOCK_FILE).exists() or (path / CHECKPOINT_FILE).exists() or bool(list_segments(path))
    )


def journal_directories(root: Path | str) -> list[Path]:
    """``root`` itself if it is a journal directory, then its ``w<N>`` subdirectories in number order."""
    base = Path(root)
    found = [base] if is_journal_directory(base) else []
    try:
        children = [
            (int(m.group(1)), child) for child in base.iterdir() if (m := _WORKER_RE.match(child.name))
        ]
    except FileNotFoundError:
        return found
    found += [child for _, child in sorted(children) if is_journal_directory(child)]
    return found


def journal_status(root: Path | str) -> list[JournalStatus]:
    """The backlog of every journal under ``root`` (see :func:`journal_directories`), read without
    taking their locks. Scans each pending part once: proportional to the backlog."""
    return [_status_of(directory) for directory in journal_directories(root)]


def _status_of(directory: Path) -> JournalStatus:
    locked, holder = _probe_lock(directory)
    segments = list_segments(directory)
    checkpoint = read_checkpoint(directory)
    start = checkpoint if checkpoint is not None else Position(segments[0] if segments else 1, 0)
    with JournalReader(directory, start) as reader:
        backlog = scan_backlog(reader)
    pending, corrupt, oldest = backlog.frames, backlog.corrupt, backlog.oldest
    live = [n for n in segments if n >= start.segment]
    size = sum(file_size(directory / segment_name(n)) for n in live)
    pending_bytes = (
        max(0, size - (start.offset if live and live[0] == start.segment else 0)) if pending else 0
    )
    return JournalStatus(
        directory=directory,
        locked=locked,
        holder=holder,
        pending_events=pending,
        pending_bytes=pending_bytes,
        oldest_pending_at=datetime.fromtimestamp(oldest, UTC) if oldest is not None else None,
        segments=len(live),
        corrupt_frames=corrupt,
        dead_lettered=_count_lines(directory / DEAD_LETTER_FILE),
        checkpoint=checkpoint,
    )


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def default_journal_root(sqlite_path: Path | None) -> Path:
    """Where the journal lives unless configured: ``meter-journal`` beside the SQLite database file,
    else ``./meter-journal``."""
    return (sqlite_path.parent if sqlite_path is not None else Path.cwd()) / "meter-journal"
