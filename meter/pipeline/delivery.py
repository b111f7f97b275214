"""Delivering one batch of journaled records: into the database, or into the dead-letter file.

The usage pipeline (meter.pipeline.pump) reads a batch from its journal and hands it to
:meth:`Delivery.deliver`; once that returns, every record of the batch is settled and the pipeline
may move the journal checkpoint past it (meter.pipeline.pump, Rule 3).

Invariants:

Rule 1: :meth:`Delivery.deliver` returns only once every record it was given is either confirmed
        in the database (by :func:`~meter.db.poison.write_isolating`: idempotent on ``event_id``,
        hourly rollup in the same transaction) or appended and fsynced to the dead-letter file
        (meter.pipeline.deadletter) with its reason. Until then it retries; it never gives a record up.
Rule 2: with raw-event retention, a record that started before the cutoff is dead-lettered
        ("expired") rather than written (meter.pipeline.retention, Rule 2).

Failure policy (every fallback counted):

* Database unreachable or refusing statements (missing table, read-only, timeouts): the batch is
  retried with exponential backoff (``retry_initial`` doubling to ``retry_max`` seconds) for as long
  as it takes; records keep accumulating in the journal. ``meter_writer_errors_total`` counts
  attempts; :attr:`Delivery.database_ok` is false and :attr:`Delivery.last_error` says why.
* A record the database refuses for its content (SQLSTATE class 22/23, or a value the driver cannot
  encode): isolated by bisection, dead-lettered (``meter_journal_dead_lettered_total{reason=
  "rejected"}``), the rest of the batch written.
* A damaged journal frame (skipped by the reader): dead-lettered with its bytes
  (``reason="corrupt"``).
* The dead-letter file cannot be written: like a database failure, the batch is retried (and the
  pipeline's checkpoint stays where it is).

Thread model: runs on the event loop; dead-letter writes run in a worker thread (:func:`in_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.engine import describe_error
from meter.db.poison import WriteOutcome, write_isolating
from meter.journal.reader import CorruptFrame
from meter.pipeline import deadletter
from meter.pipeline.metrics import PipelineCounts, PipelineMetrics
from meter.pipeline.retention import Retention

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Delivery:
    """Writes batches to ``engine``, dead-letters to ``dead_letter``; see the module docstring.

    ``journal_directory`` names the journal in corrupt-frame lines. ``retention``: None keeps every
    record. ``retry_initial``/``retry_max``: backoff bounds in seconds. ``clock``: epoch seconds, for
    the dead-letter timestamps. Records its work on ``metrics`` and ``counts``.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        dead_letter: Path,
        journal_directory: Path,
        retention: Retention | None,
        retry_initial: float,
        retry_max: float,
        clock: Callable[[], float],
        metrics: PipelineMetrics,
        counts: PipelineCounts,
    ) -> None:
        self._engine = engine
        self.dead_letter_path = dead_letter
        self._journal_directory = journal_directory
        self._retention = retention
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._clock = clock
        self._metrics = metrics
        self._counts = counts
        self.database_ok: bool | None = None  # None until the first write settled or failed
        self.last_error: str | None = None  # the last write failure, until a write succeeds

    async def deliver(self, payloads: list[bytes], corrupt: list[CorruptFrame]) -> None:
        """Write ``payloads`` and dead-letter what must be, retrying until both succeeded (Rule 1)."""
        payloads, expired = (
            self._retention.split_expired(payloads) if self._retention is not None else (payloads, [])
        )
        delay = self._retry_initial
        while True:
            started = time.perf_counter()
            try:
                outcome = await write_isolating(self._engine, payloads)
                letters = self._dead_letters(outcome, corrupt, expired)
                if letters:
                    await in_thread(
                        deadletter.append_lines, self.dead_letter_path, [line for _, line in letters]
                    )
            except Exception as exc:
                self._counts.write_errors += 1
                self._metrics.errors.inc()
                self.database_ok = False
                self.last_error = describe_error(exc)
                logger.warning(
                    "writing %d usage records failed (%s); retrying in %.2gs",
                    len(payloads),
                    self.last_error,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            break
        elapsed = time.perf_counter() - started
        self.database_ok = True
        self.last_error = None
        if payloads:
            self._metrics.batch_size.observe(len(payloads))
            self._metrics.write_duration.observe(elapsed)
        self._counts.written += outcome.written
        self._counts.inserted += outcome.inserted
        self._metrics.written.inc(outcome.written)
        self._metrics.duplicates.inc(outcome.written - outcome.inserted)
        for reason, _ in letters:
            self._metrics.dead_lettered.labels(reason).inc()
        self._counts.dead_lettered += len(letters)

    def _dead_letters(
        self, outcome: WriteOutcome, corrupt: list[CorruptFrame], expired: list[bytes]
    ) -> list[tuple[str, bytes]]:
        at = datetime.fromtimestamp(self._clock(), UTC).isoformat()
        letters: list[tuple[str, bytes]] = []
        for payload, exc in outcome.rejected:
            reason = describe_error(exc)
            line = deadletter.record_line(at, "rejected", reason, payload)
            logger.error("usage record rejected by the database (%s); dead-lettered: %s", reason, line[:300])
            letters.append(("rejected", line))
        window = self._retention.window if self._retention is not None else None
        for payload in expired:
            reason = f"started before the raw-event retention window ({window}); not written"
            letters.append(("expired", deadletter.record_line(at, "expired", reason, payload)))
        for frame in corrupt:
            logger.error(
                "journal %s: skipped %d damaged bytes at segment %d offset %d (%s); dead-lettered",
                self._journal_directory,
                frame.length,
                frame.segment,
                frame.offset,
                frame.reason,
            )
            letters.append(("corrupt", deadletter.corrupt_line(at, self._journal_directory, frame)))
        return letters


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread`` whose thread is waited for even if the caller is cancelled, so that a
    cancelled pump never leaves a journal read, a commit or a dead-letter write running while the
    journal is closed."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise
