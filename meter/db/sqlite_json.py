"""SQLite's JSON path: a batch of usage records as one JSON document that SQLite expands into rows.

A batch is one statement with one parameter, the records as a JSON array, which SQLite expands into
rows with ``json_each`` / ``json_extract``::

    INSERT INTO usage_events SELECT json_extract(value, '$.event_id'), ... FROM json_each(:doc)
    WHERE true ON CONFLICT (event_id) DO NOTHING RETURNING event_id

and the rollup is one more: ``INSERT INTO usage_hourly SELECT ... FROM usage_events WHERE event_id IN
(SELECT value FROM json_each(:ids)) GROUP BY ...`` over the ids RETURNING named, in the same
transaction. (SQLite has no INSERT in a CTE, hence two statements.) meter's process decodes each
payload, to check it and to turn ``started_at`` into the text SQLite stores, and re-encodes the batch
with orjson: a few microseconds per record, and no per-row parameter binding in SQLAlchemy.
meter.db.insert chooses between this path and binding.

Rule 1: the JSON path stores exactly what binding the row stores: ``started_at`` as the naive UTC
        text :class:`~meter.db.types.UtcDateTime` binds (``YYYY-MM-DD HH:MM:SS.ffffff``), booleans as
        0/1, every number exactly (SQLite parses the shortest round-trip text orjson writes), NULL for
        None. The one difference is the spelling of ``upstream_metrics``: SQLite stores the object
        compact, SQLAlchemy's ``json.dumps`` with spaces; both read back as the same dict.
Rule 2: a batch holding a row that the JSON path could store differently (an integer beyond 64 bits,
        a non-finite float, a NUL character, a value of an unexpected type: :func:`_json_ready`) gets
        no document, and takes the binding path instead, so such a record is refused or made
        storable exactly as before.
Rule 3: only rows that were actually new reach the rollup, in the transaction that inserted them
        (meter.db.rollups, Rule 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from math import isfinite
from typing import Any

import orjson
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.models import RECORD_FIELDS, record_to_row
from meter.db.rollups import rollup_upsert_sql
from meter.journal.payload import decode_row
from meter.records import UsageRecord

__all__ = ["payloads_document", "records_document", "sqlite_has_json", "utc_text", "write_document"]

_INT64 = range(-(1 << 63), 1 << 63)  # what sqlite3 can bind; `int in range` is a comparison, no scan
_PLAIN_METRIC = frozenset({str, int, float, bool, type(None)})
_FIELD_SET = frozenset(RECORD_FIELDS)
_DICT_OR_TIME = frozenset({"upstream_metrics", "started_at"})  # their types are checked first
_ESCAPED_NUL = b"\\u0000"


@cache
def sqlite_has_json() -> bool:
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


async def write_document(engine: AsyncEngine, document: str) -> int:
    """Insert a :func:`payloads_document` or :func:`records_document` batch and roll up its new rows,
    in one transaction; return how many were new."""
    async with engine.begin() as conn:
        result = await conn.execute(_sqlite_insert(), {"doc": document})
        inserted = result.scalars().all()
        if inserted:
            await conn.execute(_sqlite_rollup(), {"ids": orjson.dumps(inserted).decode()})
        return len(inserted)


def payloads_document(payloads: Sequence[bytes]) -> str | None:
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


def records_document(records: Sequence[UsageRecord]) -> str | None:
    """:func:`payloads_document` for records; exceptions of :func:`record_to_row` propagate (the
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
