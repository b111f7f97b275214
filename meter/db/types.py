"""Column types and SQL expressions that behave the same on SQLite and PostgreSQL.

Invariants:

Rule 1: timestamps are stored in UTC and always come back timezone-aware (UTC). PostgreSQL has
        ``timestamptz``; SQLite has no timezone support, so :class:`UtcDateTime` converts to UTC and
        stores the naive UTC value as SQLAlchemy's fixed-width text ``YYYY-MM-DD HH:MM:SS.ffffff``,
        which sorts and compares as time.
Rule 2: a naive ``datetime`` handed to the database is taken to be UTC (``UsageRecord`` documents
        its times as UTC); it is never interpreted in the server's local zone.
Rule 3: :func:`utc_day` yields the UTC calendar date as ``'YYYY-MM-DD'`` text on both backends, so
        a report grouped by day is identical whichever database produced it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, String
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always binds UTC and always returns aware UTC values."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)  # Rule 1: naive UTC text, comparable as text
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class utc_day(FunctionElement[str]):  # lower case: it reads as a SQL function where it is used
    """``utc_day(column)``: the UTC date of a :class:`UtcDateTime` column as ``'YYYY-MM-DD'`` text."""

    type = String()
    inherit_cache = True
    name = "utc_day"

    def __init__(self, column: ColumnElement[datetime]) -> None:
        super().__init__(column)


@compiles(utc_day, "postgresql")
def _utc_day_postgresql(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    # AT TIME ZONE on a timestamptz yields the wall-clock time in that zone, independent of the
    # session's TimeZone setting.
    return f"to_char(({compiler.process(element.clauses, **kw)}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


@compiles(utc_day, "sqlite")
def _utc_day_sqlite(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    # Rule 1 stores naive UTC text whose first ten characters are the date.
    return f"substr({compiler.process(element.clauses, **kw)}, 1, 10)"


@compiles(utc_day)
def _utc_day_default(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    raise NotImplementedError(f"utc_day() has no implementation for the {compiler.dialect.name} dialect")
