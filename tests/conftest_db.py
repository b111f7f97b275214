"""Database fixtures for tests/db/ (and anyone else who needs a real database).

Fixtures (import them into tests/conftest.py to share them):

* ``db_sqlite_url``: a bare ``sqlite:///`` URL to a fresh file in ``tmp_path`` (not migrated).
* ``db_postgres_url``: a URL to a freshly created, uniquely named PostgreSQL database
  (``meter_test_<hex>``), dropped afterwards. Fails the test loudly if PostgreSQL is unreachable.
* ``db_url``: parametrised over both of the above (the postgres case carries ``@pytest.mark.postgres``);
  a test using it is a contract test run once per backend.
* ``db_engine``: an ``AsyncEngine`` on ``db_url``, migrated to head, disposed afterwards.

PostgreSQL is the machine's server at 127.0.0.1:5432 (user ``postgres``, trust auth); set
``METER_TEST_POSTGRES_URL`` to an admin URL to point the tests elsewhere.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db import migrate
from meter.db.engine import create_engine
from meter.records import Outcome, UsageRecord, UsageSource, new_event_id

POSTGRES_ADMIN_URL = os.environ.get(
    "METER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def postgres_url_for(database: str) -> str:
    """``POSTGRES_ADMIN_URL`` pointed at ``database``."""
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


def unique_database_name() -> str:
    return f"meter_test_{secrets.token_hex(6)}"


async def _admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except Exception as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({type(exc).__name__}: {exc}); "
            "tests marked 'postgres' need it (deselect with -m 'not postgres')",
            pytrace=False,
        )


async def create_database(name: str) -> None:
    conn = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(name: str) -> None:
    conn = await _admin()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def make_record(**overrides: Any) -> UsageRecord:
    """A valid :class:`UsageRecord` with a fresh event id; keyword arguments replace fields."""
    values: dict[str, Any] = {
        "event_id": new_event_id(),
        "started_at": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        "method": "POST",
        "endpoint": "/v1/chat/completions",
        "status_code": 200,
        "outcome": Outcome.OK,
        "usage_source": UsageSource.REPORTED,
    }
    values.update(overrides)
    return UsageRecord(**values)


@pytest.fixture
def db_sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'meter.db'}"


@pytest.fixture
async def db_postgres_url() -> AsyncIterator[str]:
    name = unique_database_name()
    await create_database(name)
    try:
        yield postgres_url_for(name)
    finally:
        await drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("db_sqlite_url" if request.param == "sqlite" else "db_postgres_url")
    return url


@asynccontextmanager
async def migrated_engine(url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on ``url`` with every migration applied, disposed afterwards."""
    await migrate.upgrade(url)
    engine = create_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def db_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    async with migrated_engine(db_url) as engine:
        yield engine


def every_field_record() -> UsageRecord:
    """A record with every field set to a non-default, awkward value (big token counts, a non-UTC
    offset, unicode), for round-trip tests. ``reasoning_tokens`` stays None on purpose: "not reported"
    must survive a round trip as None, not 0. A test asserts no other field is left at its default,
    so a field added to UsageRecord cannot silently escape the round-trip tests."""
    return make_record(
        started_at=datetime(2024, 5, 1, 23, 30, 15, 123456, tzinfo=timezone(timedelta(hours=-2))),
        method="POST",
        endpoint="/v1/completions",
        status_code=499,
        outcome=Outcome.ABORTED,
        usage_source=UsageSource.ESTIMATED,
        stream=True,
        key_fingerprint="f" * 64,
        key_suffix="...abcd",
        team="search",
        requested_model="llama-v3-70b",
        response_model="accounts/fireworks/models/llama-v3-70b-instruct",
        response_id="cmpl-1",
        request_id="req-1",
        finish_reason="stop,length",
        prompt_tokens=9_000_000_000,  # beyond 32 bits: the columns are BIGINT
        completion_tokens=7,
        cached_tokens=0,
        reasoning_tokens=None,
        total_tokens=9_000_000_007,
        duration_ms=1234.5,
        upstream_headers_ms=100.25,
        ttft_ms=150.125,
        output_tokens_per_second=42.0,
        overhead_ms=0.75,
        server_ttft_ms=90.5,
        server_processing_ms=1000.0,
        upstream_metrics={"prefill_ms": 12.5, "queue_ms": 0.0, "count": 3},
        request_bytes=2048,
        response_bytes=4096,
        error="client went away: ünïcödé ✓",
        cost_nanos=12_345_678_901,
        price_ref="sheet:2025-08-01:llama-v3-70b",
    )
