"""meter.db.engine: URL normalisation, per-backend engine settings, and ping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from meter.db.engine import create_engine, normalize_url, ping


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///meter.db", "sqlite+aiosqlite:///meter.db"),
        ("sqlite:////var/lib/meter/meter.db", "sqlite+aiosqlite:////var/lib/meter/meter.db"),
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://u:p%40ss@db:5432/meter", "postgresql+asyncpg://u:p%40ss@db:5432/meter"),
        ("postgres://u@db/meter?ssl=require", "postgresql+asyncpg://u@db/meter?ssl=require"),
        ("PostgreSQL://db/meter", "postgresql+asyncpg://db/meter"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgresql+psycopg://db/meter", "postgresql+psycopg://db/meter"),
    ],
)
def test_normalize_url_picks_the_asyncio_driver_and_keeps_the_rest(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


@pytest.mark.parametrize("url", ["", "meter.db", "mysql://db/meter", "://x"])
def test_normalize_url_rejects_what_it_cannot_serve(url: str) -> None:
    with pytest.raises(ValueError, match="database URL"):
        normalize_url(url)


async def test_sqlite_connections_use_wal_busy_timeout_and_normal_sync(db_sqlite_url: str) -> None:
    engine = create_engine(db_sqlite_url)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == 5000
            assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == 1  # NORMAL
    finally:
        await engine.dispose()


async def test_ping_reachable_sqlite_is_none(db_sqlite_url: str) -> None:
    engine = create_engine(db_sqlite_url)
    try:
        assert await ping(engine, timeout=5) is None
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_ping_reachable_postgres_is_none(db_postgres_url: str) -> None:
    engine = create_engine(db_postgres_url)
    try:
        assert await ping(engine, timeout=5) is None
    finally:
        await engine.dispose()


async def test_ping_closed_port_gives_a_short_reason() -> None:
    engine = create_engine("postgresql://postgres@127.0.0.1:1/meter")
    try:
        reason = await ping(engine, timeout=5)
    finally:
        await engine.dispose()
    assert reason is not None
    assert "ConnectionRefused" in reason
    assert "\n" not in reason and len(reason) <= 200


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A loopback port that accepts connections and never says a word (a hung database)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_ping_times_out_on_a_silent_server(silent_server: int) -> None:
    engine = create_engine(f"postgresql://postgres@127.0.0.1:{silent_server}/meter")
    try:
        assert await ping(engine, timeout=0.2) == "no answer within 0.2s"
    finally:
        await engine.dispose()
