"""What :meth:`~meter.journal.store.Journal.open` finds on disk: the checkpoint, the backlog, and where
appends continue (meter.journal.store, Rules 3, 4 and 6).

Rule 1: segments wholly before the checkpoint are deleted: a crash came between writing the
        checkpoint and deleting what it consumed.
Rule 2: an incomplete frame at the end of the newest segment (a crash mid-write; meter.journal.reader,
        Rule 3) is cut off, so appends after a restart continue on a frame boundary.
Rule 3: appends continue the newest segment only if it ends exactly where the reader stopped and has
        room; otherwise (full, or shorter than the checkpoint says because a power loss took its
        unsynced tail) they start a new segment, never behind the checkpoint, so new frames never
        hide behind it.
Rule 4: the pending count is the number of valid frames after the checkpoint, counted here once.

Blocking: scans the pending part of the journal once. Runs under the journal's lock, before anything
is appended.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from meter.journal.frames import Position, file_size, list_segments, read_checkpoint, segment_name
from meter.journal.reader import JournalReader, scan_backlog

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Recovered:
    checkpoint: Position  # everything before it is in the database
    write_at: Position  # where the next frame goes
    pending: int  # valid frames after the checkpoint
    oldest_pending_at: float | None  # event_time() of the first pending record
    disk_bytes: int  # size of the segments from the checkpoint's on


def recover(directory: Path, segment_bytes: int) -> Recovered:
    """Recover the journal in ``directory`` (Rules 1-4); the caller holds its lock."""
    segments = list_segments(directory)
    checkpoint = read_checkpoint(directory)
    if checkpoint is None:
        checkpoint = Position(segments[0] if segments else 1, 0)
    for number in segments:
        if number < checkpoint.segment:  # consumed; a crash came between checkpoint and unlink
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / segment_name(number))
    segments = [n for n in segments if n >= checkpoint.segment]

    with JournalReader(directory, checkpoint) as reader:
        backlog = scan_backlog(reader)
    pending, oldest, end = backlog.frames, backlog.oldest, backlog.end

    write_seg, write_off = checkpoint.segment, 0
    if segments:
        last = segments[-1]
        path = directory / segment_name(last)
        size = path.stat().st_size
        if end.segment == last and end.offset < size:
            # Rule 2: an incomplete frame from a crash mid-write; cut it off.
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
        if end.segment == last and end.offset == size and size < segment_bytes:
            write_seg, write_off = last, size  # continue the newest segment
        else:
            # Full, or shorter than the checkpoint says (its tail was lost with the power).
            write_seg = last + 1
    if Position(write_seg, write_off) < checkpoint:
        write_seg, write_off = checkpoint.segment + 1, 0
    return Recovered(
        checkpoint=checkpoint,
        write_at=Position(write_seg, write_off),
        pending=pending,
        oldest_pending_at=oldest,
        disk_bytes=sum(file_size(directory / segment_name(n)) for n in segments),
    )
