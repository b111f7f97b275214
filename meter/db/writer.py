"""Writing usage records into ``usage_events`` (and the ``usage_hourly`` rollup), idempotently.

:func:`write_payloads` and :func:`write_batch` are the primitives every writer uses (meter.delivery
for the pipeline's journal pump and replay, and the in-memory :class:`BatchWriter` below);
:func:`write_isolating` adds poison isolation on top.

On PostgreSQL a batch is one statement with one parameter: the records' JSON payloads (exactly as
the journal holds them, :mod:`meter.payload`) joined into a JSON array, which the server turns into
rows with ``json_populate_recordset``::

    WITH ins AS (INSERT INTO usage_events SELECT ... FROM json_populate_recordset(...)
                 ON CONFLICT (event_id) DO NOTHING RETURNING ...),
         rolled AS (INSERT INTO usage_hourly SELECT ... FROM ins GROUP BY ... ON CONFLICT DO UPDATE ...)
    SELECT count(*) FROM ins

meter's process spends about a microsecond per record on it (no decoding, no per-column encoding),
leaving its CPU to the proxy; the parsing runs in the database. The transaction sets its TimeZone
to UTC, so a naive ``started_at`` is taken as UTC there too (meter.db.types, Rule 2).

On SQLite a batch is likewise one statement with one parameter, the records as a JSON array, which
SQLite expands into rows with ``json_each`` / ``json_extract``::

    INSERT INTO usage_events SELECT json_extract(value, '$.event_id'), ... FROM json_each(:doc)
    WHERE true ON CONFLICT (event_id) DO NOTHING RETURNING event_id

and the rollup is one more: ``INSERT INTO usage_hourly SELECT ... FROM usage_events WHERE event_id IN
(SELECT value FROM json_each(:ids)) GROUP BY ...`` over the ids RETURNING named, in the same
transaction. (SQLite has no INSERT in a CTE, hence two statements.) meter's process decodes each
payload, to check it and to turn ``started_at`` into the text SQLite stores, and re-encodes the batch
with orjson: a few microseconds per record, and no per-row parameter binding in SQLAlchemy.

The JSON path stores exactly what binding the row stores: ``started_at`` as the naive UTC text
:class:`~meter.db.types.UtcDateTime` binds (``YYYY-MM-DD HH:MM:SS.ffffff``), booleans as 0/1, every
number exactly (SQLite parses the shortest round-trip text orjson writes), NULL for None. The one
difference is the spelling of ``upstream_metrics``: SQLite stores the object compact, SQLAlchemy's
``json.dumps`` with spaces; both read back as the same dict. A batch holding a row that the JSON path
could store differently (an integer beyond 64 bits, a non-finite float, a NUL character, a value of
an unexpected type: :func:`_json_ready`) takes the binding path instead, so such a record is refused
or made storable exactly as before: rows sent as an executemany that SQLAlchemy's
"insertmanyvalues" turns into multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING event_id``
statements, then the same rollup over the ids. Other backends (PostgreSQL through a driver other
than asyncpg) always take the binding path.

Either way only rows that were actually new reach the rollup, in the transaction that inserted them
(meter.db.rollups, Rule 1): a replay changes neither table.

The in-memory writer
--------------------

The request path calls :meth:`BatchWriter.submit`, which appends to an in-memory queue and returns;
it never awaits, never touches the database and never raises. One background task drains the queue
in batches of up to ``batch_size`` records, waiting at most ``flush_interval`` seconds for a batch
to fill, and writes each batch with :func:`write_batch` in one transaction, as above.

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
  "integrity constraint violation", or a value the driver cannot encode): the batch is bisected
  until the offending records are isolated, the others are written, and each offending record is
  moved to the in-memory ``rejected_records()`` list, counted in ``rejected`` and reported to
  ``on_error`` as :class:`RecordRejectedError`. Without this one bad record would block every later
  record forever. A schema change that makes *every* record fail this way (e.g. a new NOT NULL
  column the running code does not fill) rejects them all; they stay in memory, counted.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from math import isfinite
from typing import Any, TypeVar

import orjson
from sqlalchemy import TextClause, bindparam, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.dml import Insert

from meter.db.engine import describe_error
from meter.db.models import RECORD_FIELDS, make_storable, record_to_row, usage_events
from meter.db.rollups import ROLLUP_INPUTS, rollup_upsert_sql
from meter.payload import decode_row, encode_record, storable_payload
from meter.records import UsageRecord

logger = logging.getLogger(__name__)

# SQLSTATE classes that blame the row, not the database: 22 data exception, 23 integrity violation.
_RECORD_SQLSTATE_CLASSES = frozenset({"22", "23"})
_SET_UTC = text("SET LOCAL TimeZone = 'UTC'")
T = TypeVar("T")


class PendingOverflowError(Exception):
    """The writer refused records because ``max_pending`` were already waiting for the database."""


class RecordRejectedError(Exception):
    """The database refused one record for its content; ``__cause__`` is the database's error."""

    def __init__(self, record: UsageRecord, reason: str) -> None:
        super().__init__(f"usage record {record.event_id} rejected: {reason}")
        self.record = record


def _insert_for(dialect_name: str) -> Insert:
    table = usage_events
    if dialect_name == "postgresql":
        pg = postgresql.insert(table).on_conflict_do_nothing(index_elements=[table.c.event_id])
        return pg.returning(table.c.event_id)
    if dialect_name == "sqlite":
        lite = sqlite.insert(table).on_conflict_do_nothing(index_elements=[table.c.event_id])
        return lite.returning(table.c.event_id)
    raise NotImplementedError(f"no idempotent insert for the {dialect_name} dialect")


def _is_postgres(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg"


@cache
def _postgres_insert() -> TextClause:
    columns = ", ".join(RECORD_FIELDS)
    return text(
        f"""
        WITH ins AS (
            INSERT INTO usage_events ({columns})
            SELECT {columns}
            FROM json_populate_recordset(CAST(NULL AS usage_events), CAST(:payloads AS JSON))
            ON CONFLICT (event_id) DO NOTHING
            RETURNING {", ".join(ROLLUP_INPUTS)}
        ), rolled AS (
            {rollup_upsert_sql("postgresql", "ins")}
        )
        SELECT count(*) FROM ins
        """
    )


@cache
def _rollup_by_ids(dialect_name: str) -> TextClause:
    sql = rollup_upsert_sql(dialect_name, "usage_events WHERE event_id IN :ids")
    return text(sql).bindparams(bindparam("ids", expanding=True))


# Statement sizes the binding path uses. Every distinct row (or id) count is a distinct SQL text, and
# sqlite3 keeps up to 128 prepared statements per connection: batches of arbitrary sizes filled that
# cache with huge statements (~120 MB of RSS under load). Decomposing a batch into these sizes bounds
# the distinct statements to len(_CHUNK_SIZES) per shape. (The JSON path has two fixed statements.)
_CHUNK_SIZES = (512, 64, 8, 1)


def _fixed_chunks(items: list[T], sizes: tuple[int, ...] = _CHUNK_SIZES) -> list[list[T]]:
    chunks: list[list[T]] = []
    start = 0
    for size in sizes:
        while len(items) - start >= size:
            chunks.append(items[start : start + size])
            start += size
    return chunks


async def _write_rows(engine: AsyncEngine, rows: list[dict[str, Any]]) -> int:
    """The binding path: ``rows`` (storable, :func:`~meter.db.models.make_storable`) as executemany."""
    async with engine.begin() as conn:
        inserted: list[Any] = []
        for chunk in _fixed_chunks(rows):
            result = await conn.execute(_insert_for(engine.dialect.name), chunk)
            inserted.extend(result.scalars())
        inserted = list(dict.fromkeys(inserted))
        for ids in _fixed_chunks(inserted):
            await conn.execute(_rollup_by_ids(engine.dialect.name), {"ids": ids})
        return len(inserted)


# -- SQLite: the JSON path -------------------------------------------------------------------------

_INT64 = range(-(1 << 63), 1 << 63)  # what sqlite3 can bind; `int in range` is a comparison, no scan
_PLAIN_METRIC = frozenset({str, int, float, bool, type(None)})
_FIELD_SET = frozenset(RECORD_FIELDS)
_DICT_OR_TIME = frozenset({"upstream_metrics", "started_at"})  # their types are checked first
_ESCAPED_NUL = b"\\u0000"


@cache
def _sqlite_has_json() -> bool:
    """json_each/json_extract are built in from SQLite 3.38 (before, only if compiled with JSON1); a
    missing function would look like an outage and be retried for ever, so older libraries bind."""
    import sqlite3  # here: a PostgreSQL-only process need not load it

    return sqlite3.sqlite_version_info >= (3, 38, 0)


@cache
def _sqlite_insert() -> TextClause:
    columns = ", ".join(RECORD_FIELDS)
    values = ", ".join(f"json_extract(v, '$.{name}')" for name in RECORD_FIELDS)
    # MATERIALIZED: reading json_each's value directly, every json_extract would have json_each render
    # the row's object again (35 times a row; it tripled the statement's cost). "WHERE true" is
    # SQLite's documented way to keep ON CONFLICT from parsing as a join constraint.
    return text(
        f"""
        WITH batch(v) AS MATERIALIZED (SELECT value FROM json_each(:doc))
        INSERT INTO usage_events ({columns})
        SELECT {values} FROM batch WHERE true
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id
        """
    )


@cache
def _sqlite_rollup() -> TextClause:
    source = "usage_events WHERE event_id IN (SELECT value FROM json_each(:ids))"
    return text(rollup_upsert_sql("sqlite", source))


async def _write_document(engine: AsyncEngine, document: str) -> int:
    async with engine.begin() as conn:
        result = await conn.execute(_sqlite_insert(), {"doc": document})
        inserted = result.scalars().all()
        if inserted:
            await conn.execute(_sqlite_rollup(), {"ids": orjson.dumps(inserted).decode()})
        return len(inserted)


def _payloads_document(payloads: Sequence[bytes]) -> str | None:
    """The JSON array :func:`_sqlite_insert` expands, or None if a payload is not a plain record (or
    not a record at all): the batch then takes the binding path, which judges it as it always did."""
    rows: list[dict[str, Any]] = []
    try:
        for payload in payloads:
            row = _plain_payload_row(payload)
            if row is None:  # not orjson's plain output: read it as the binding path does
                row = decode_row(payload)
                if not _json_ready(row):
                    return None
                row["started_at"] = utc_text(row["started_at"])
            rows.append(row)
        return orjson.dumps(rows).decode()
    except Exception:  # whatever it is, the binding path raises it (or stores the record) as before
        return None


def _records_document(records: Sequence[UsageRecord]) -> str | None:
    """:func:`_payloads_document` for records; exceptions of :func:`record_to_row` propagate (the
    binding path would raise them first too)."""
    rows = [record_to_row(record) for record in records]
    for row in rows:
        if not _json_ready(row):
            return None
    try:
        for row in rows:
            row["started_at"] = utc_text(row["started_at"])
        return orjson.dumps(rows).decode()
    except Exception:  # an out-of-range date, a lone surrogate: the binding path decides
        return None


def _plain_payload_row(payload: bytes) -> dict[str, Any] | None:
    """The common case, fast: an orjson payload (so floats are finite, strings valid UTF-8) with
    exactly the record's fields, no NUL, every value :func:`_json_ready` allows; decoded, with
    ``started_at`` as its stored text. None for anything else."""
    if payload[:1] != b"{" or _ESCAPED_NUL in payload:
        return None
    row = orjson.loads(payload)
    if type(row) is not dict or row.keys() != _FIELD_SET:
        return None
    started = row["started_at"]
    if (
        type(started) is not str
        or type(row["outcome"]) is not str
        or type(row["usage_source"]) is not str
        or type(row["stream"]) is not bool
    ):
        return None
    metrics = row["upstream_metrics"]
    if metrics is None:
        row["upstream_metrics"] = metrics = {}  # as decode_row reads it
    elif type(metrics) is not dict or not _plain_metrics(metrics):
        return None
    for value in row.values():
        kind = type(value)
        if kind is int:
            if value not in _INT64:
                return None
        elif kind is list or (kind is dict and value is not metrics):
            return None
    row["started_at"] = _stored_time(started)
    return row


def _json_ready(row: dict[str, Any]) -> bool:
    """True if ``row`` (every record field, ``started_at`` a datetime, as :func:`decode_row` or
    :func:`record_to_row` give it) is storable as it is (:func:`make_storable` would change nothing)
    and the JSON path stores exactly what binding it would: None, bool, str without NUL, int within
    64 bits, finite float; ``outcome`` and ``usage_source`` str, ``stream`` bool (SQLAlchemy's
    Boolean refuses other values) and ``upstream_metrics`` a dict of such scalars (json.dumps and
    orjson agree on those)."""
    if (
        type(row["started_at"]) is not datetime
        or type(row["outcome"]) is not str
        or type(row["usage_source"]) is not str
        or type(row["stream"]) is not bool
    ):
        return False
    metrics = row["upstream_metrics"]
    if type(metrics) is not dict or not _plain_metrics(metrics):
        return False
    for name, value in row.items():
        kind = type(value)
        if kind is str:
            if "\x00" in value:
                return False
        elif kind is int:
            if value not in _INT64:
                return False
        elif kind is float:
            if not isfinite(value):
                return False
        elif not (value is None or kind is bool or name in _DICT_OR_TIME):
            return False
    return True


def _plain_metrics(metrics: dict[Any, Any]) -> bool:
    for key, value in metrics.items():
        if type(key) is not str or type(value) not in _PLAIN_METRIC:
            return False
        if type(value) is float and not isfinite(value):
            return False
    return True


def utc_text(moment: datetime) -> str:
    """``moment`` as SQLite stores a :class:`~meter.db.types.UtcDateTime`: naive UTC (a naive value is
    UTC already), ``YYYY-MM-DD HH:MM:SS.ffffff``; the text SQLAlchemy's binding produces."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(" ", "microseconds")


def _stored_time(iso: str) -> str:
    """:func:`utc_text` of a payload's ``started_at``. orjson writes a UTC time as
    ``YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00``; once ``fromisoformat`` has accepted that shape, its
    digits are the stored text's, so it is sliced rather than formatted (4x faster)."""
    moment = datetime.fromisoformat(iso)
    if moment.tzinfo is UTC and iso.endswith("+00:00") and iso[4:17:3] == "--T::":
        if len(iso) == 32 and iso[19] == ".":
            return f"{iso[:10]} {iso[11:26]}"
        if len(iso) == 25:
            return f"{iso[:10]} {iso[11:19]}.000000"
    return utc_text(moment)


async def write_payloads(engine: AsyncEngine, payloads: Sequence[bytes]) -> int:
    """Store the records in ``payloads`` (:func:`meter.payload.encode_record` output) in one
    transaction; return how many were new (the rest were already stored).

    Raises whatever the database raises (nothing is retried here), and ``ValueError`` for a payload
    that is not a usage record.
    """
    if not payloads:
        return 0
    if _is_postgres(engine):
        document = b"[" + b",".join(storable_payload(payload) for payload in payloads) + b"]"
        async with engine.begin() as conn:
            await conn.execute(_SET_UTC)
            result = await conn.execute(_postgres_insert(), {"payloads": document.decode()})
            return int(result.scalar_one())
    if engine.dialect.name == "sqlite" and _sqlite_has_json():
        batch = _payloads_document(payloads)
        if batch is not None:
            return await _write_document(engine, batch)
    return await _write_rows(engine, [make_storable(decode_row(payload)) for payload in payloads])


async def write_batch(engine: AsyncEngine, records: Sequence[UsageRecord]) -> int:
    """Store ``records`` in one transaction; return how many were new (the rest were already stored).

    The new rows' sums are added to ``usage_hourly`` in the same transaction (see the module
    docstring). Raises whatever the database raises; nothing is retried here.
    """
    if not records:
        return 0
    if _is_postgres(engine):
        return await write_payloads(engine, [encode_record(record) for record in records])
    if engine.dialect.name == "sqlite" and _sqlite_has_json():
        batch = _records_document(records)
        if batch is not None:
            return await _write_document(engine, batch)
    return await _write_rows(engine, [record_to_row(record) for record in records])


@dataclass(slots=True)
class WriteOutcome:
    """What :func:`write_isolating` did: ``written`` records are in the database, ``inserted`` of
    them new (the rest were already stored); ``rejected`` are the payloads the database refused,
    each with its error."""

    written: int = 0
    inserted: int = 0
    rejected: list[tuple[bytes, Exception]] = field(default_factory=list)


async def write_isolating(engine: AsyncEngine, payloads: Sequence[bytes]) -> WriteOutcome:
    """:func:`write_payloads`, but a record error (:func:`is_record_error`) splits the batch in
    halves until the offending payloads are isolated; the others are written. Any other error
    propagates (the caller retries the whole batch; halves already written then count as already
    stored, which the idempotent insert makes harmless)."""
    outcome = WriteOutcome()
    await _write_or_split(engine, list(payloads), outcome)
    return outcome


async def _write_or_split(engine: AsyncEngine, payloads: list[bytes], outcome: WriteOutcome) -> None:
    try:
        inserted = await write_payloads(engine, payloads)
    except Exception as exc:
        if not is_record_error(exc):
            raise
        if len(payloads) == 1:
            outcome.rejected.append((payloads[0], exc))
            return
        middle = len(payloads) // 2
        await _write_or_split(engine, payloads[:middle], outcome)
        await _write_or_split(engine, payloads[middle:], outcome)
        return
    outcome.written += len(payloads)
    outcome.inserted += inserted


def is_record_error(exc: BaseException) -> bool:
    """True if ``exc`` blames the records being written rather than the database or the connection."""
    if isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        # asyncpg's adapter reports data exceptions as a plain DBAPIError; the SQLSTATE says which.
        state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if isinstance(state, str):
            return state[:2] in _RECORD_SQLSTATE_CLASSES
        if "integer overflow" in str(exc.orig):
            return True  # SQLite: a token count so large that summing it into the rollup overflows
        # No SQLSTATE: asyncpg refused to encode a parameter (e.g. an int beyond 64 bits), which it
        # reports as an InterfaceError that is also a ValueError. Nothing reached the server.
        return isinstance(exc.orig, TypeError | ValueError | ArithmeticError) and not isinstance(
            exc.orig, OSError
        )
    if isinstance(exc, sa_exc.StatementError):
        return True  # raised while binding parameters, before anything reached the database
    # Raised by record_to_row or by the driver encoding a value (sqlite3: int out of range).
    return isinstance(exc, TypeError | ValueError | ArithmeticError | AttributeError)


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
