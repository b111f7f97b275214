"""Storing usage records in ``usage_events`` (and the ``usage_hourly`` rollup), idempotently, one
transaction a batch.

:func:`write_payloads` and :func:`write_batch` are the primitives the pipeline writes with
(meter.pipeline.delivery, for the journal pump and replay);
:func:`~meter.db.poison.write_isolating` adds poison isolation on top.

On PostgreSQL a batch is one statement with one parameter: the records' JSON payloads (exactly as
the journal holds them, :mod:`meter.journal.payload`) joined into a JSON array, which the server turns into
rows with ``json_populate_recordset``::

    WITH ins AS (INSERT INTO usage_events SELECT ... FROM json_populate_recordset(...)
                 ON CONFLICT (event_id) DO NOTHING RETURNING ...),
         rolled AS (INSERT INTO usage_hourly SELECT ... FROM ins GROUP BY ... ON CONFLICT DO UPDATE ...)
    SELECT count(*) FROM ins

meter's process spends about a microsecond per record on it (no decoding, no per-column encoding),
leaving its CPU to the proxy; the parsing runs in the database. The transaction sets its TimeZone
to UTC, so a naive ``started_at`` is taken as UTC there too (meter.db.types, Rule 2).

On SQLite a batch is likewise one statement with one parameter, the records as a JSON array that
SQLite expands into rows, and one more for the rollup (meter.db.sqlite_json). A batch that path
could store differently takes the binding path instead.

Either document is built ``DOCUMENT_SLICE`` records at a time with a turn of the event loop between
slices, so that preparing a full batch does not hold up the requests in flight.

The binding path: rows sent as an executemany that SQLAlchemy's "insertmanyvalues" turns into
multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING event_id`` statements, then the same rollup
over the ids. Other backends (PostgreSQL through a driver other than asyncpg) always take it.

Rule 1: writing is idempotent on ``event_id``: replaying records (after a retry whose commit did
        reach the database, or from a journal) stores nothing twice; the count returned is of the
        records that were new.
Rule 2: either way only rows that were actually new reach the rollup, in the transaction that
        inserted them (meter.db.rollups, Rule 1): a replay changes neither table.
Rule 3: nothing is retried here: whatever the database raises propagates to the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import TextClause, bindparam, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.dml import Insert

from meter.db.models import RECORD_FIELDS, make_storable, record_to_row, usage_events
from meter.db.rollups import ROLLUP_INPUTS, rollup_upsert_sql
from meter.db.sqlite_json import payloads_document, records_document, sqlite_has_json, write_document
from meter.journal.payload import decode_row, encode_record, storable_payload
from meter.records import UsageRecord

__all__ = ["write_batch", "write_payloads"]

_SET_UTC = text("SET LOCAL TimeZone = 'UTC'")
T = TypeVar("T")


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


# Records put into a batch's document per turn of the event loop. Preparing a record takes the
# loop's thread ~2 µs for PostgreSQL and 12-15 µs for SQLite (which decodes and re-encodes it): a
# whole batch of 1,000 in one go held the loop for 2-3 and 12-16 ms, which every request in flight
# waited out (python bench/writer_throughput.py, "loop held").
DOCUMENT_SLICE = 64
R = TypeVar("R")


async def _in_slices(build: Callable[[Sequence[T]], R], items: Sequence[T]) -> list[R]:
    """``build`` over ``items``, ``DOCUMENT_SLICE`` items at a time, with a turn of the event loop
    between slices."""
    parts: list[R] = []
    for start in range(0, len(items), DOCUMENT_SLICE):
        if start:
            await asyncio.sleep(0)
        parts.append(build(items[start : start + DOCUMENT_SLICE]))
    return parts


def _json_array(parts: list[str | None]) -> str | None:
    """JSON arrays (orjson's compact text, none empty) joined into one; None if a part is None (a
    slice the JSON path cannot take: then the whole batch takes the binding path)."""
    texts = [part for part in parts if part is not None]
    if len(texts) < len(parts):
        return None
    return texts[0] if len(texts) == 1 else "[" + ",".join(text[1:-1] for text in texts) + "]"


def _postgres_items(payloads: Sequence[bytes]) -> bytes:
    return b",".join(storable_payload(payload) for payload in payloads)


async def write_payloads(engine: AsyncEngine, payloads: Sequence[bytes]) -> int:
    """Store the records in ``payloads`` (:func:`meter.journal.payload.encode_record` output) in one
    transaction; return how many were new (the rest were already stored).

    Raises whatever the database raises (nothing is retried here), and ``ValueError`` for a payload
    that is not a usage record.
    """
    if not payloads:
        return 0
    if _is_postgres(engine):
        document = b"[" + b",".join(await _in_slices(_postgres_items, payloads)) + b"]"
        async with engine.begin() as conn:
            await conn.execute(_SET_UTC)
            result = await conn.execute(_postgres_insert(), {"payloads": document.decode()})
            return int(result.scalar_one())
    if engine.dialect.name == "sqlite" and sqlite_has_json():
        batch = _json_array(await _in_slices(payloads_document, payloads))
        if batch is not None:
            return await write_document(engine, batch)
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
    if engine.dialect.name == "sqlite" and sqlite_has_json():
        batch = _json_array(await _in_slices(records_document, records))
        if batch is not None:
            return await write_document(engine, batch)
    return await _write_rows(engine, [record_to_row(record) for record in records])
