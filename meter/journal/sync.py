"""Durability of journal appends against power loss: the journal's fsync policy and its group-fsync
thread (meter.journal.store, Rule 1).

An append reaches the OS with its one ``write``; this module decides when it reaches the disk. With
an interval, a background thread fsyncs every ``interval`` seconds when something was written (group
commit: one fsync covers every append since the last). With ``"always"``, the appending thread
fsyncs inside every append.

Rule 1: one sync pass covers, in order: segments rotated away since the last pass (then closes
        them), the directory when a segment file was created since, and the segment last appended
        to (the tail).
Rule 2: a segment descriptor is never closed while it is the tail, so the tail's fsync never hits a
        closed (or reused) descriptor; a rotated-away tail is closed by a later pass.
Rule 3: a failed background fsync is logged and kept in :attr:`GroupSync.error` until one succeeds.

Thread model: :meth:`GroupSync.appended`, :meth:`GroupSync.retire` and :meth:`GroupSync.created`
belong to the appending thread; :meth:`GroupSync.sync` may run in any thread (one at a time, under a
lock); the background loop runs in its own daemon thread.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Literal

from meter.journal.frames import Position

logger = logging.getLogger(__name__)

FsyncPolicy = float | Literal["always"]  # seconds between group fsyncs, or fsync inside every append

DEFAULT_FSYNC_INTERVAL = 0.1


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


class GroupSync:
    """The fsync side of one journal ``directory`` under ``fsync`` (already validated)."""

    def __init__(self, directory: Path, fsync: FsyncPolicy) -> None:
        self.directory = directory
        self.always = fsync == "always"
        self._interval = 0.0 if fsync == "always" else float(fsync)
        self._tail: tuple[int, Position] | None = None  # (fd, end) of the last append
        self._retired: collections.deque[int] = collections.deque()  # rotated fds, closed after fsync
        self._dirty = False
        self._dir_dirty = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    # -- the appending thread -------------------------------------------------------------------

    def appended(self, fd: int, end: Position) -> None:
        """A frame ending at ``end`` was written to ``fd``: fsync now ("always") or mark it for the
        next pass."""
        self._tail = (fd, end)
        if self.always:
            os.fsync(fd)
        else:
            self._dirty = True

    def retire(self, fd: int) -> None:
        """``fd`` was rotated away from: fsync and close it in the next pass."""
        self._retired.append(fd)

    def created(self) -> None:
        """A segment file was created: its directory entry must reach the disk too."""
        if self.always:
            fsync_dir(self.directory)
        else:
            self._dir_dirty = True

    # -- any thread ---------------------------------------------------------------------------------

    def sync(self) -> None:
        """fsync everything appended so far (and rotated segments, and new directory entries)."""
        with self._lock:
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
                fsync_dir(self.directory)
            if tail is not None:
                os.fsync(tail[0])  # never closed while it is the tail (Rule 2)

    def start(self) -> None:
        """Start the background thread (none with ``"always"``)."""
        if self.always:
            return
        self._thread = threading.Thread(
            target=self._loop, name=f"meter-journal-fsync:{self.directory.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread and wait for it (its last pass included)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self, current: int | None) -> None:
        """Close ``current`` (the open write segment, if any) and every retired descriptor."""
        with self._lock:
            for fd in {*self._retired, *([current] if current is not None else [])}:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._retired.clear()
            self._tail = None

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            if not (self._dirty or self._retired or self._dir_dirty):
                continue
            try:
                self.sync()
            except OSError as exc:
                self.error = f"fsync failed: {exc}"
                logger.error("journal %s: %s", self.directory, self.error)
            else:
                self.error = None


def fsync_dir(directory: Path) -> None:
    """fsync ``directory``, so that entries created or renamed in it survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
