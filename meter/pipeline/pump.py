"""The usage pipeline: request path → journal → database, exactly once.

:meth:`Pipeline.submit` appends the record to the :class:`~meter.journal.store.Journal` (one ``write``
syscall; the record has reached the OS when it returns) and wakes the pump. The pump, one background
task, reads batches from the journal's checkpoint on, hands each to :class:`~meter.pipeline.delivery.Delivery`
(written idempotently on ``event_id``, hourly rollup in the same transaction, or dead-lettered), and
only after that settled advances the journal checkpoint. A crash between the two replays the batch,
which the idempotent insert turns into a no-op: at-least-once delivery plus an idempotent write is
exactly once.

Invariants:

Rule 1: the request path never waits for the database and never sees an exception from here.
Rule 2: at most ``concurrency`` batches (``batch_size`` records each) are in memory; an outage's
        backlog waits on disk. On PostgreSQL two batches are in flight by default (the server
        parses and indexes each on its own backend, so a second one uses a second core); their
        checkpoints are committed strictly in journal order.
Rule 3: the checkpoint moves past a record only once the database has it, or it is in the
        dead-letter file (JSON lines in the journal directory by default) with the reason
        (meter.pipeline.delivery, Rule 1).
Rule 4: with ``retention_days`` set, old raw events are deleted and a journaled record already past
        retention is dead-lettered instead of written (meter.pipeline.retention).

Failure policy (fail-open for requests; every fallback counted):

* The database failing or refusing records, damaged journal frames, an unwritable dead-letter file:
  see meter.pipeline.delivery. The batch is retried until settled; the checkpoint waits for it, and
  :meth:`Pipeline.status` reports ``database_ok: false`` and the last error meanwhile.
* The journal cannot be appended to (disk full, I/O error): the record is kept in memory, up to
  ``max_memory`` records, and the pump writes it straight to the database
  (``meter_journal_append_errors_total``). Such records are NOT durable: a crash before the write
  loses them. Beyond ``max_memory`` records are dropped and counted in
  ``meter_journal_dropped_events_total``. :meth:`Pipeline.readiness` reports not ready meanwhile.
* Reading the journal or writing its checkpoint fails (I/O error): retried with backoff; the pump
  waits rather than dies, and :meth:`Pipeline.readiness` reports not ready meanwhile.
* :meth:`Pipeline.stop` drains what it can within its timeout; the rest stays in the journal for the
  next start (or ``meter journal replay``, meter.pipeline.replay).

Thread model: :meth:`Pipeline.submit` is called on the event loop thread. Journal reads, commits and
dead-letter writes run in worker threads (blocking file I/O and fsync).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.journal.payload import encode_record, json_text
from meter.journal.reader import JournalReader, ReadBatch
from meter.journal.store import DEAD_LETTER_FILE, Journal, event_time
from meter.pipeline.delivery import Delivery, in_thread
from meter.pipeline.metrics import PipelineCounts, PipelineMetrics
from meter.pipeline.readiness import judge_readiness
from meter.pipeline.retention import RETENTION_INTERVAL_S, Retention
from meter.records import UsageRecord

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_MEMORY = 100_000
DEFAULT_POSTGRES_CONCURRENCY = 2
GAUGE_INTERVAL_S = 1.0


class Pipeline:
    """Journal → database pump; see the module docstring. One start/stop cycle per instance: stop
    closes the journal. Registers its metrics on ``registry`` (so: one pipeline per registry).

    ``batch_size``: records per database write. ``flush_interval``: seconds to wait for a batch to
    fill before writing a smaller one. ``dead_letter``: the dead-letter file (default
    ``<journal dir>/dead-letter.jsonl``). ``retention_days``: delete raw events older than this
    (None keeps them). ``retry_initial``/``retry_max``: backoff bounds in seconds for database and
    journal I/O failures. ``max_memory``: records held in memory while the journal refuses appends.
    ``retention_interval``: seconds between retention runs. ``concurrency``: batches in flight (None:
    2 on PostgreSQL, 1 elsewhere). ``clock``: epoch seconds, for ages and the retention cutoff.
    """

    def __init__(
        self,
        journal: Journal,
        engine: AsyncEngine,
        *,
        registry: CollectorRegistry,
        batch_size: int = 250,
        flush_interval: float = 0.05,
        dead_letter: Path | None = None,
        retention_days: float | None = None,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        max_memory: int = DEFAULT_MAX_MEMORY,
        retention_interval: float = RETENTION_INTERVAL_S,
        concurrency: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if flush_interval < 0 or retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("flush_interval must be >= 0 and 0 < retry_initial <= retry_max")
        if retention_days is not None and retention_days <= 0:
            raise ValueError(f"retention_days must be positive, got {retention_days}")
        self._journal = journal
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._max_memory = max_memory
        self._clock = clock
        if concurrency is None:
            # PostgreSQL parses and indexes a batch on its own backend: a second batch in flight
            # uses a second core. SQLite has one writer at a time.
            concurrency = DEFAULT_POSTGRES_CONCURRENCY if engine.dialect.name == "postgresql" else 1
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self._concurrency = concurrency

        self._memory: deque[UsageRecord] = deque()  # records the journal refused (not durable)
        self._reader: JournalReader | None = None
        self._task: asyncio.Task[None] | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self._has_data = asyncio.Event()
        self._batch_ready = asyncio.Event()
        self._idle = asyncio.Event()  # set by the pump when everything submitted is settled
        self._stopping = False
        self._stopped = False
        self._hurry = 0
        self._append_error: str | None = None  # set while the journal refuses appends
        self._io_error: str | None = None  # set while reading or committing the journal fails
        self._counts = PipelineCounts()

        self.metrics = PipelineMetrics(registry)
        self._retention = (
            Retention(
                engine,
                retention_days,
                clock=clock,
                deleted=self.metrics.retention_deleted,
                interval=retention_interval,
            )
            if retention_days is not None
            else None
        )
        self._delivery = Delivery(
            engine,
            dead_letter=dead_letter if dead_letter is not None else journal.directory / DEAD_LETTER_FILE,
            journal_directory=journal.directory,
            retention=self._retention,
            retry_initial=retry_initial,
            retry_max=retry_max,
            clock=clock,
            metrics=self.metrics,
            counts=self._counts,
        )
        self._gauge_task: asyncio.Task[None] | None = None
        self._refresh_gauges()

    # -- request path ---------------------------------------------------------------------------

    def submit(self, record: UsageRecord) -> None:
        """Journal ``record`` and wake the pump. Cheap; never awaits; never raises (Rule 1)."""
        try:
            if self._stopped:
                self._drop(record, "the pipeline was already stopped")
                return
            try:
                self._journal.append(record)
            except Exception as exc:
                self._journal_refused(record, exc)
            else:
                if self._append_error is not None:
                    logger.warning("the journal accepts records again")
                    self._append_error = None
            self._idle.clear()
            pending = self.pending
            if pending == 1:  # the oldest pending record just arrived; the ticker ages it from here
                self._refresh_gauges()
            else:
                self.metrics.pending.set(pending)
            if not self._has_data.is_set():
                self._has_data.set()
            if pending >= self._batch_size and not self._batch_ready.is_set():
                self._batch_ready.set()
        except Exception:  # pragma: no cover - defensive: Rule 1 holds even against our own bugs
            logger.exception("Pipeline.submit failed for usage record %s", getattr(record, "event_id", "?"))

    def _journal_refused(self, record: UsageRecord, exc: Exception) -> None:
        self.metrics.append_errors.inc()
        self._counts.append_errors += 1
        if self._append_error is None:
            logger.error(
                "the journal refused a usage record (%s); keeping records in memory until it recovers "
                "(not crash-safe)",
                exc,
            )
        self._append_error = f"{type(exc).__name__}: {exc}"
        if len(self._memory) >= self._max_memory:
            self._drop(record, f"the in-memory fallback is full ({self._max_memory} records)")
            return
        self._memory.append(record)

    def _drop(self, record: UsageRecord, why: str) -> None:
        self.metrics.dropped.inc()
        self._counts.dropped += 1
        logger.error("usage record %s lost: %s: %s", record.event_id, why, _record_json(record).decode())

    # -- state ----------------------------------------------------------------------------------

    @property
    def journal(self) -> Journal:
        return self._journal

    @property
    def pending(self) -> int:
        """Records submitted (or found in the journal at start) and not yet settled."""
        return self._journal.pending + len(self._memory)

    @property
    def concurrency(self) -> int:
        """Batches written at once."""
        return self._concurrency

    @property
    def dead_letter_path(self) -> Path:
        return self._delivery.dead_letter_path

    @property
    def counts(self) -> PipelineCounts:
        """This pipeline's tallies since it was created (its status reports them)."""
        return self._counts

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _refresh_gauges(self) -> None:
        self.metrics.pending.set(self.pending)
        self.metrics.oldest_age.set(self._oldest_age())

    async def _gauge_loop(self) -> None:
        while True:  # the age grows by itself; the pending count is also set on every change
            await asyncio.sleep(GAUGE_INTERVAL_S)
            self._refresh_gauges()

    def _oldest_age(self) -> float:
        times = [t for t in (self._journal.oldest_pending_at,) if t is not None]
        if self._memory:
            times.append(event_time(self._memory[0]))
        return max(0.0, self._clock() - min(times)) if times else 0.0

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot for ``/readyz``, the admin API and ``meter journal status``."""
        stats = self._journal.stats()
        return {
            "journal": str(self._journal.directory),
            "pending": self.pending,
            "pending_bytes": stats.pending_bytes,
            "in_memory": len(self._memory),
            "oldest_pending_age_s": round(self._oldest_age(), 3) if self.pending else None,
            "written": self._counts.written,
            "duplicates": self._counts.written - self._counts.inserted,
            "write_errors": self._counts.write_errors,
            "dead_lettered": self._counts.dead_lettered,
            "append_errors": self._counts.append_errors,
            "dropped": self._counts.dropped,
            "database_ok": self._delivery.database_ok,
            "last_error": self._delivery.last_error,
            "journal_ok": not (self._append_error or self._io_error or stats.sync_error),
            "journal_error": self._append_error or self._io_error or stats.sync_error,
            "running": self.running,
        }

    def readiness(self, *, min_free_bytes: int = 64 * 1024 * 1024) -> dict[str, Any]:
        """Whether this process can take traffic without losing usage records; the rules are in
        meter.pipeline.readiness."""
        return judge_readiness(self.status(), self._journal.directory, min_free_bytes=min_free_bytes)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the pump (and the retention task, if configured)."""
        if self.running:
            return
        if self._stopped:
            raise RuntimeError("a stopped Pipeline cannot be restarted (its journal is closed)")
        self._stopping = False
        self._reader = self._journal.reader()
        self._task = asyncio.create_task(self._run(), name="meter-journal-pump")
        self._task.add_done_callback(_log_death)
        self._gauge_task = asyncio.create_task(self._gauge_loop(), name="meter-journal-gauges")
        if self._retention is not None:
            self._retention_task = asyncio.create_task(self._retention.loop(), name="meter-retention")

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far (and everything the journal held at start) is in
        the database or dead-lettered. False if ``timeout`` seconds passed first."""
        if not self.running:
            raise RuntimeError("Pipeline.flush() needs a started pipeline")
        self._hurry += 1
        self._wake()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        finally:
            self._hurry -= 1
        return True

    async def stop(self, timeout: float) -> None:
        """Drain to the database for up to ``timeout`` seconds, then stop and close the journal.
        Whatever was not written stays in the journal for the next start or a replay."""
        if self._stopped:
            return
        self._stopping = True
        task, self._task = self._task, None
        for helper in (self._retention_task, self._gauge_task):
            if helper is not None:
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await helper
        self._retention_task = self._gauge_task = None
        if task is not None:
            self._wake()
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                logger.warning(
                    "usage pipeline stopped after %gs with %d records not yet in the database; they stay "
                    "in the journal %s",
                    timeout,
                    self.pending,
                    self._journal.directory,
                )
            except Exception:
                pass  # the pump died of a bug; _log_death logged it and the journal keeps the records
        self._stopped = True
        self._rescue_memory()
        self._refresh_gauges()
        if self._reader is not None:
            self._reader.close()
        await asyncio.to_thread(self._journal.close)

    def _rescue_memory(self) -> None:
        """Records only in memory at stop: journal them now if the disk recovered, else they are lost."""
        while self._memory:
            record = self._memory.popleft()
            try:
                self._journal.append(record)
            except Exception as exc:
                self._drop(record, f"the pipeline stopped and the journal still refuses records ({exc})")

    # -- the pump -------------------------------------------------------------------------------

    def _wake(self) -> None:
        self._has_data.set()
        self._batch_ready.set()

    async def _run(self) -> None:
        reader = self._reader
        assert reader is not None
        # Batches being written, oldest first. Up to `concurrency` are in flight; the checkpoint
        # only ever advances past the oldest, once it is settled (Rule 3).
        inflight: deque[tuple[asyncio.Task[None], ReadBatch]] = deque()
        try:
            while True:
                while inflight and (inflight[0][0].done() or len(inflight) >= self._concurrency):
                    task, batch = inflight[0]
                    await task
                    await self._journal_io(
                        "commit the checkpoint", self._journal.commit, batch.end, batch.frames
                    )
                    inflight.popleft()
                    self._refresh_gauges()
                if self._memory and not inflight:
                    await self._write_memory()
                    continue
                hurry = self._stopping or self._hurry > 0
                unread = self._journal.pending - sum(batch.frames for _, batch in inflight)
                if reader.position >= self._journal.end or (
                    inflight and unread < self._batch_size and not hurry
                ):
                    if inflight:  # nothing (much) to read: settle what is being written first
                        await asyncio.wait([inflight[0][0]])
                        continue
                    if self._memory:
                        continue
                    self._idle.set()
                    if self._stopping:
                        return
                    self._has_data.clear()
                    if reader.position < self._journal.end or self._memory:
                        continue
                    await self._has_data.wait()
                    continue
                if not inflight and not hurry and unread < self._batch_size:
                    # Linger so that a trickle of records still goes out as one statement.
                    self._batch_ready.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._flush_interval):
                            await self._batch_ready.wait()
                limit = self._journal.end
                batch = await self._journal_io(
                    "read the journal", partial(reader.read, self._batch_size, limit, mode="payloads")
                )
                if not batch.frames and not batch.corrupt:
                    # The journal's end is ahead of the reader but nothing could be read: a segment
                    # went missing under us. Do not spin.
                    logger.error(
                        "journal %s: cannot read past %s (end %s)",
                        self._journal.directory,
                        reader.position,
                        limit,
                    )
                    await asyncio.sleep(self._retry_max)
                    continue
                self._counts.read += len(batch.payloads)
                task = asyncio.create_task(
                    self._delivery.deliver(batch.payloads, batch.corrupt), name="meter-journal-write"
                )
                inflight.append((task, batch))
        finally:
            for task, _ in inflight:
                task.cancel()
            for task, _ in inflight:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _journal_io(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking journal operation in a thread, retrying a disk error with backoff: the
        pump waits (not ready, records still journaled if the disk allows) rather than dies."""
        delay = self._retry_initial
        while True:
            try:
                result = await in_thread(fn, *args)
            except OSError as exc:
                self._io_error = f"cannot {what}: {exc}"
                logger.error(
                    "journal %s: %s; retrying in %.2gs", self._journal.directory, self._io_error, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            self._io_error = None
            return result

    async def _write_memory(self) -> None:
        records = list(islice(self._memory, self._batch_size))
        await self._delivery.deliver([encode_record(record) for record in records], [])
        for _ in records:
            self._memory.popleft()
        self._refresh_gauges()

    async def run_retention(self) -> int:
        """Delete raw events older than ``retention_days`` now (meter.pipeline.retention); returns how many.
        The background task does this at start and every ``retention_interval`` seconds."""
        return 0 if self._retention is None else await self._retention.run()


# -- helpers ----------------------------------------------------------------------------------------


def _record_json(record: UsageRecord) -> bytes:
    return json_text(encode_record(record))


def _log_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("usage pipeline pump died", exc_info=task.exception())
