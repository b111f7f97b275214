"""Database URLs and async engines: the one place that knows which driver each backend uses.

Invariants:

Rule 1: every engine meter creates is an ``AsyncEngine``; a plain ``sqlite:///`` or
        ``postgresql://`` URL from the user is mapped to its asyncio driver (aiosqlite, asyncpg) by
        :func:`normalize_url`, and an explicit ``dialect+driver`` is kept as given.
Rule 2: SQLite connections run in WAL mode with ``synchronous=NORMAL`` and a busy timeout, so the
        background writer and report readers in other processes do not fail with "database is
        locked" and a commit costs no fsync of the main database file.
Rule 3: PostgreSQL connections are pre-pinged on checkout (a server restart costs one reconnect, not
        one failed batch) and the pool is small: meter's only steady writer is one background task.

Failure policy: this module never retries. :func:`ping` turns any failure into a short reason string
for health endpoints and start-up checks; callers decide whether that is fatal.

Secrets: a URL in an error this module raises or describes is masked (:mod:`meter.redact`), so a
password never reaches a log line, ``/readyz`` or the CLI through it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from meter.redact import mask_url, mask_urls_in

# Bare schemes a user may write, and the asyncio driver meter uses for each.
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",  # Heroku-style URLs; SQLAlchemy itself rejects this spelling
}

SQLITE_BUSY_TIMEOUT_MS = 5_000
POSTGRES_POOL_SIZE = 5
POSTGRES_MAX_OVERFLOW = 5
POSTGRES_CONNECT_TIMEOUT_S = 10.0  # asyncpg's default of 60 s would stall the writer on a black hole
POOL_RECYCLE_S = 1_800  # below typical load-balancer idle cut-offs


def normalize_url(url: str) -> str:
    """Return ``url`` with the asyncio driver meter uses for its backend.

    Only the scheme is rewritten; the rest of the URL (credentials, host, query) is kept byte for byte.
    Raises :class:`ValueError` for an empty URL or a bare scheme meter has no driver for.
    """
    scheme, sep, rest = url.strip().partition("://")
    if not sep or not scheme:
        raise ValueError(f"database URL {mask_url(url)!r} is not of the form 'scheme://...'")
    scheme = scheme.lower()
    if "+" in scheme:
        return f"{scheme}://{rest}"
    try:
        return f"{_ASYNC_DRIVERS[scheme]}://{rest}"
    except KeyError:
        supported = ", ".join(sorted(_ASYNC_DRIVERS))
        raise ValueError(
            f"database URL scheme {scheme!r} is not supported (use one of: {supported})"
        ) from None


def backend_name(url: str) -> str:
    """The SQLAlchemy dialect name of ``url``: ``"sqlite"`` or ``"postgresql"``."""
    return normalize_url(url).partition("://")[0].partition("+")[0]


def create_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    """An :class:`AsyncEngine` for ``url`` (normalised first), configured per backend (see Rules 2-3)."""
    url = normalize_url(url)
    backend = backend_name(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if backend == "postgresql":
        kwargs.update(
            pool_pre_ping=True,
            pool_size=POSTGRES_POOL_SIZE,
            max_overflow=POSTGRES_MAX_OVERFLOW,
            pool_recycle=POOL_RECYCLE_S,
        )
        if url.startswith("postgresql+asyncpg://"):
            kwargs["connect_args"] = {"timeout": POSTGRES_CONNECT_TIMEOUT_S}
    elif backend == "sqlite":
        # sqlite3's own lock wait, in seconds; the PRAGMA below covers connections made elsewhere.
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    engine = create_async_engine(url, **kwargs)
    if backend == "sqlite":
        event.listen(engine.sync_engine, "connect", _configure_sqlite)
    return engine


def _configure_sqlite(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL is a property of the database file (it persists); the other two are per connection.
        # An in-memory database answers "memory" to journal_mode=WAL, which is harmless.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


async def ping(engine: AsyncEngine, timeout: float = 2.0) -> str | None:
    """``None`` if a ``SELECT 1`` round trip completes within ``timeout`` seconds, else a one-line reason."""
    try:
        async with asyncio.timeout(timeout):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except Exception as exc:
        return describe_error(exc)
    return None


def describe_error(exc: BaseException, limit: int = 200) -> str:
    """A short, single-line description of a database error for logs and health checks.

    SQLAlchemy wraps driver errors with the SQL and parameters attached; those can be huge (a whole
    batch) and are not wanted in a health answer, so only the driver's message is kept, with any URL
    in it masked.
    """
    orig = getattr(exc, "orig", None)
    inner = orig if isinstance(orig, BaseException) else exc
    text = mask_urls_in(str(inner)).strip()
    message = text.splitlines()[0] if text else ""
    reason = f"{type(inner).__name__}: {message}" if message else type(inner).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."
