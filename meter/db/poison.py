"""Poison isolation: telling a record the database refuses from a database that refuses everything,
and writing the other records around it.

A record error (:func:`is_record_error`) blames the records being written: SQLSTATE class 22 "data
exception" or 23 "integrity constraint violation", or a value the driver cannot encode (nothing
reached the server). Any other error (database unreachable, timing out, refusing the statement as a
whole: missing table, lost connection, read-only standby, ...) blames the database.
:func:`write_isolating` serves meter.pipeline.delivery (the pipeline's journal pump).

Rule 1: a record error splits the batch in halves until the offending records are isolated; the
        others are written. Without this one bad record would block every later record forever.
Rule 2: any other error propagates (the caller retries the whole batch; halves already written then
        count as already stored, which the idempotent insert, meter.db.insert Rule 1, makes harmless).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.insert import write_payloads

__all__ = ["WriteOutcome", "is_record_error", "write_isolating"]

# SQLSTATE classes that blame the row, not the database: 22 data exception, 23 integrity violation.
_RECORD_SQLSTATE_CLASSES = frozenset({"22", "23"})


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
