"""The in-memory batch writer: usage records queued on the request path, written to the database by
one background task.

The request path calls :meth:`BatchWriter.submit`, which appends to an in-memory queue and returns;
it never awaits, never touches the database and never raises. One background task drains the queue
in batches of up to ``batch_size`` records, waiting at most ``flush_interval`` seconds for a batch
to fill, and writes each batch with :func:`~meter.db.insert.write_batch` in one transaction
(idempotently, with the hourly rollup: meter.db.insert).

Invariants:

Rule 1: writing is idempotent on ``event_id``: replaying records (after a retry whose commit did
        reach the database, or from a journal) stores nothing twice. ``written`` counts records
        confirmed in the database, whether this call inserted them or they were already there
        (``duplicates``).
Rule 2: records leave in submission order, and a batch's records are counted as pending until the
        database has confirmed them or rejected them (see the failure policy).
Rule 3: one background task, one batch in flight: the writer holds at most one pooled connection.

Failure policy (fail-open for the request path, never lose silently):

* Database unreachable, timing out, or refusing the statement as a whole (missing table, lost
  connection, read-only standby, ...): the batch is kept and retried with exponential backoff
  (``retry_initial`` doubling to ``retry_max`` seconds) for as long as the process lives.
  Each failed attempt increments ``failed_batches`` and is passed to ``on_error``; records keep
  queueing behind it.
* A record the database refuses for its own content (SQLSTATE class 22 "data exception" or 23
  "integrity constraint violation", or a value the driver cannot encode: meter.db.poison): the
  batch is bisected until the offending records are isolated, the others are written, and each
  offending record is moved to the in-memory ``rejected_records()`` list, counted in ``rejected``
  and reported to ``on_error`` as :class:`RecordRejectedError`. Without this one bad record would
  block every later record forever. A schema change that makes *every* record fail this way (e.g.
  a new NOT NULL column the running code does not fill) rejects them all; they stay in memory,
  counted.
* More than ``max_pending`` records pending (a long outage): new records are refused and counted in
  ``dropped``; ``on_error`` receives one :class:`PendingOverflowError` per overflow episode. This
  bound keeps an outage from exhausting memory; billing-grade durability comes from the on-disk
  journal that sits in front of this writer, which replays through :func:`write_batch`.
* :meth:`BatchWriter.stop` flushes everything pending; if the database does not take it within
  ``timeout`` the task is cancelled and the records remain available from ``unwritten()``.
* ``on_error`` is called on the event loop and must not block; an exception it raises is logged
  and otherwise ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.engine import describe_error
from meter.db.insert import write_batch
from meter.db.poison import is_record_error
from meter.records import UsageRecord

__all__ = ["BatchWriter", "PendingOverflowError", "RecordRejectedError"]

logger = logging.getLogger(__name__)


class PendingOverflowError(Exception):
    """The writer refused records because ``max_pending`` were already waiting for the database."""


class RecordRejectedError(Exception):
    """The database refused one record for its content; ``__cause__`` is the database's error."""

    def __init__(self, record: UsageRecord, reason: str) -> None:
        super().__init__(f"usage record {record.event_id} rejected: {reason}")
        self.record = record


class BatchWriter:
    """Background batch writer of :class:`UsageRecord` rows; see the module docstring for the policy."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.05,
        max_pending: int = 100_000,
        on_error: Callable[[Exception], None] | None = None,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_pending < batch_size:
            raise ValueError(f"max_pending ({max_pending}) must be at least batch_size ({batch_size})")
        if flush_interval < 0 or retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("flush_interval must be >= 0 and 0 < retry_initial <= retry_max")
        self._engine = engine
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_pending = max_pending
        self._on_error = on_error
        self._retry_initial = retry_initial
        self._retry_max = retry_max

        self._queue: deque[UsageRecord] = deque()
        self._inflight: list[UsageRecord] = []
        self._settled = 0  # leading records of _inflight already written or rejected
        self._has_data = asyncio.Event()
        self._batch_ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._hurry = 0  # flush() callers waiting: skip the wait for a full batch
        self._overflowing = False

        self._written = 0
        self._duplicates = 0
        self._failed_batches = 0
        self._dropped = 0
        self._rejected: list[tuple[UsageRecord, Exception]] = []

    # -- request path ---------------------------------------------------------------------------

    def submit(self, record: UsageRecord) -> None:
        """Queue ``record`` for writing. O(1); never awaits, never raises (see the overflow policy)."""
        if self.pending >= self._max_pending:
            self._dropped += 1
            if not self._overflowing:
                self._overflowing = True
                self._report(PendingOverflowError(f"{self.pending} records pending; refusing new ones"))
            return
        self._overflowing = False
        self._queue.append(record)
        self._idle.clear()
        if not self._has_data.is_set():
            self._has_data.set()
        if len(self._queue) >= self._batch_size and not self._batch_ready.is_set():
            self._batch_ready.set()

    # -- counters -------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records submitted and neither confirmed by the database nor rejected."""
        return len(self._queue) + len(self._inflight) - self._settled

    @property
    def written(self) -> int:
        """Records confirmed in the database (inserted now or already present)."""
        return self._written

    @property
    def duplicates(self) -> int:
        """Of ``written``, records whose event_id was already stored (replays)."""
        return self._duplicates

    @property
    def failed_batches(self) -> int:
        """Write attempts that failed and were (or will be) retried."""
        return self._failed_batches

    @property
    def dropped(self) -> int:
        """Records refused by :meth:`submit` because ``max_pending`` were waiting."""
        return self._dropped

    @property
    def rejected(self) -> int:
        """Records the database refused for their content (see :meth:`rejected_records`)."""
        return len(self._rejected)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def unwritten(self) -> list[UsageRecord]:
        """A copy of the pending records, oldest first (for a journal or a last-ditch dump)."""
        return self._inflight[self._settled :] + list(self._queue)

    def rejected_records(self) -> list[tuple[UsageRecord, Exception]]:
        """A copy of the records the database refused, each with the error it gave."""
        return list(self._rejected)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background task (again, after :meth:`stop`). Records submitted before are kept."""
        if self.running:
            return
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="meter-db-writer")
        self._task.add_done_callback(self._task_done)

    async def stop(self, timeout: float = 10.0) -> None:
        """Write everything pending, then stop. After ``timeout`` seconds the task is cancelled and
        whatever the database did not take stays pending (see :meth:`unwritten`)."""
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        self._wake()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            logger.error("database writer stopped after %gs with %d records unwritten", timeout, self.pending)
        except Exception:
            pass  # the task died of a bug; _task_done logged it and the records are still pending

    async def flush(self) -> None:
        """Wait until every record submitted so far is written or rejected. Waits through outages;
        bound it with ``asyncio.timeout`` if that matters."""
        if not self.running:
            raise RuntimeError("BatchWriter.flush() needs a started writer")
        self._hurry += 1
        self._wake()
        try:
            await self._idle.wait()
        finally:
            self._hurry -= 1

    # -- background task ------------------------------------------------------------------------

    def _wake(self) -> None:
        self._has_data.set()
        self._batch_ready.set()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                if self._stopping:
                    return
                self._has_data.clear()
                await self._has_data.wait()
                continue
            if len(self._queue) < self._batch_size and not (self._stopping or self._hurry):
                # Linger so that a trickle of records still goes out as one statement.
                self._batch_ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._flush_interval):
                        await self._batch_ready.wait()
            size = min(len(self._queue), self._batch_size)
            self._inflight = [self._queue.popleft() for _ in range(size)]
            self._settled = 0
            try:
                await self._deliver()
            finally:
                # Only on cancellation is anything left unsettled; keep it, in order, for a restart.
                self._queue.extendleft(reversed(self._inflight[self._settled :]))
                self._inflight = []
                self._settled = 0

    async def _deliver(self) -> None:
        delay = self._retry_initial
        while self._settled < len(self._inflight):
            try:
                await self._write_or_bisect(self._inflight[self._settled :])
            except Exception as exc:
                self._failed_batches += 1
                logger.warning(
                    "writing %d usage records failed (%s); retrying in %.2gs",
                    len(self._inflight) - self._settled,
                    describe_error(exc),
                    delay,
                )
                self._report(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)

    async def _write_or_bisect(self, records: list[UsageRecord]) -> None:
        """Write ``records`` (a contiguous run starting at ``_settled``). A record error splits the
        run in halves until single bad records remain; any other error propagates for a retry."""
        try:
            inserted = await write_batch(self._engine, records)
        except Exception as exc:
            if not is_record_error(exc):
                raise
            if len(records) == 1:
                self._reject(records[0], exc)
                return
            middle = len(records) // 2
            await self._write_or_bisect(records[:middle])
            await self._write_or_bisect(records[middle:])
            return
        self._written += len(records)
        self._duplicates += len(records) - inserted
        self._settled += len(records)

    def _reject(self, record: UsageRecord, exc: Exception) -> None:
        reason = describe_error(exc)
        logger.error("usage record %s rejected by the database: %s", record.event_id, reason)
        self._rejected.append((record, exc))
        self._settled += 1
        rejection = RecordRejectedError(record, reason)
        rejection.__cause__ = exc
        self._report(rejection)

    def _report(self, exc: Exception) -> None:
        if self._on_error is None:
            return
        try:
            self._on_error(exc)
        except Exception:
            logger.exception("BatchWriter on_error callback raised")

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("database writer task died", exc_info=task.exception())
