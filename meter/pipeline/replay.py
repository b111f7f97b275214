"""Replay: drain a journal another process left behind (``meter journal replay``) into the database.

Rule 1: replay takes each journal's lock (meter.journal.store, Rule 5), so it never races a live owner.
Rule 2: it runs the same :class:`~meter.pipeline.pump.Pipeline` as a live process, so a replay is exactly
        as idempotent: replaying a journal twice inserts nothing the second time, and what the
        database refuses is dead-lettered as usual.

Failure policy: a database outage is waited through for up to ``timeout`` seconds; the rest stays in
the journal and is reported in :attr:`ReplayResult.remaining`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.errors import JournalLocked
from meter.journal.store import Journal, journal_directories
from meter.pipeline.pump import Pipeline


@dataclass(slots=True)
class ReplayResult:
    directories: list[Path] = field(default_factory=list)  # journals drained (or attempted)
    skipped_locked: list[Path] = field(default_factory=list)  # owned by a live process: left alone
    read: int = 0  # records read from the journals
    written: int = 0  # confirmed in the database
    inserted: int = 0  # of written, new (the rest were already stored)
    dead_lettered: int = 0
    remaining: int = 0  # still pending when replay gave up (timeout); 0 means fully drained


async def replay(
    directory: Path | str,
    engine: AsyncEngine,
    *,
    timeout: float | None = None,
    batch_size: int = 1000,
    retention_days: float | None = None,
    retry_max: float = 5.0,
) -> ReplayResult:
    """Drain the journal at ``directory`` (or every ``w<N>`` journal under it) into the database.

    Takes each journal's lock, so it never races a live owner: a single journal directory that is
    locked raises :class:`~meter.errors.JournalLocked`; under a root, locked subdirectories are
    skipped and listed. Idempotent: replaying a journal twice inserts nothing the second time.
    Waits through database outages for up to ``timeout`` seconds (forever if None), then leaves the
    rest in the journal and reports it in ``remaining``.
    """
    base = Path(directory)
    if not base.is_dir():
        raise FileNotFoundError(f"no journal directory at {base}")
    deadline = None if timeout is None else time.monotonic() + timeout
    result = ReplayResult()
    for path in journal_directories(base):
        try:
            journal = await asyncio.to_thread(Journal.open, path, create=False)
        except JournalLocked:
            if path == base:
                raise
            result.skipped_locked.append(path)
            continue
        result.directories.append(path)
        pipeline = Pipeline(
            journal,
            engine,
            registry=CollectorRegistry(),
            batch_size=batch_size,
            flush_interval=0,
            retention_days=retention_days,
            retry_max=retry_max,
        )
        await pipeline.start()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        drained = await pipeline.flush(timeout=left)
        await pipeline.stop(timeout=10.0 if drained else 0.0)
        counts = pipeline.counts
        result.read += counts.read
        result.written += counts.written
        result.inserted += counts.inserted
        result.dead_lettered += counts.dead_lettered
        result.remaining += pipeline.pending
    return result
