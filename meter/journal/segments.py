"""Appending frames to the journal's segment files, and rotating them (meter.journal.store, Rules 1-2).

Rule 1: a frame is written with one ``os.write`` on an ``O_APPEND`` descriptor, so it reaches the
        OS before :meth:`SegmentWriter.write` returns. A failed or short write is cut back off the
        file (``ftruncate`` to where the frame began), so a frame is either wholly in a segment or
        not at all; if even the cut fails, the next write starts a new segment instead.
Rule 2: frames only ever go to the newest segment. A segment rotates (the next file is started)
        when the next frame would take it past ``segment_bytes``; a segment always takes at least
        one frame.
Rule 3: a rotated-away descriptor is handed to :class:`~meter.journal.sync.GroupSync`, which fsyncs
        and closes it; a new segment file's directory entry is fsynced the same way.

Thread model: a :class:`SegmentWriter` belongs to the one appending thread (the event loop).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from meter.journal.frames import Position, segment_name
from meter.journal.sync import GroupSync

logger = logging.getLogger(__name__)


class SegmentWriter:
    """Writes frames into ``directory``'s segments from ``start`` on (where open recovered the end
    of the journal; a non-zero offset continues that segment)."""

    def __init__(self, directory: Path, start: Position, *, segment_bytes: int, sync: GroupSync) -> None:
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._sync = sync
        self._seg = start.segment
        self._off = start.offset
        self._fd: int | None = None
        self._broken = False  # a failed write could not be cut back: start a new segment

    @property
    def fd(self) -> int | None:
        """The open write segment's descriptor, None before the first write and after close."""
        return self._fd

    def write(self, frame: bytes) -> tuple[int, Position]:
        """Write ``frame`` (Rule 1), rotating first if it would not fit (Rule 2); return the segment's
        descriptor and the position after the frame. Raises ``OSError``; after an error nothing of
        the frame is in the journal."""
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
        return fd, Position(self._seg, self._off)

    def close(self) -> None:
        """Close the write segment and every rotated one (after the caller's final sync)."""
        self._sync.release(self._fd)
        self._fd = None

    def _roll(self) -> int:
        """Open the write segment: the current one on first use, else the next one (Rule 2)."""
        if self._fd is not None:
            self._sync.retire(self._fd)  # fsynced and closed by the next sync pass
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
        self._sync.created()
        return fd

    def _cut_back(self, fd: int) -> None:
        try:
            os.ftruncate(fd, self._off)
        except OSError as exc:
            logger.error(
                "journal %s: cannot cut a failed write back (%s); starting a new segment", self.directory, exc
            )
            self._broken = True
