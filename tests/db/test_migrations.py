"""Alembic migrations: up to head and down to base on SQLite and PostgreSQL; head matches the models."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from meter.db import migrate
from meter.db.engine import create_engine
from meter.db.models import Base
from tests.support.paths import ROOT

EXPECTED_INDEXES = {
    "ix_usage_events_started_at": ["started_at"],
    "ix_usage_events_team_started_at": ["team", "started_at"],
    "ix_usage_events_key_fingerprint_started_at": ["key_fingerprint", "started_at"],
    "ix_usage_events_requested_model_started_at": ["requested_model", "started_at"],
}
EXPECTED_ROLLUP_INDEXES = {
    "ix_usage_hourly_team_hour": ["team", "hour"],
    "ix_usage_hourly_key_fingerprint_hour": ["key_fingerprint", "hour"],
}


def _schema(connection: Connection) -> dict[str, Any]:
    inspector = inspect(connection)
    tables = set(inspector.get_table_names())
    indexes = (
        {ix["name"]: ix["column_names"] for ix in inspector.get_indexes("usage_events")}
        if "usage_events" in tables
        else {}
    )
    rollup_indexes = (
        {ix["name"]: ix["column_names"] for ix in inspector.get_indexes("usage_hourly")}
        if "usage_hourly" in tables
        else {}
    )
    return {"tables": tables, "indexes": indexes, "rollup_indexes": rollup_indexes}


def _diff_against_models(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "version_table": migrate.VERSION_TABLE}
    )
    return list(compare_metadata(context, Base.metadata))


async def _inspect(url: str, fn: Any) -> Any:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def test_migrations_are_found_in_the_repository() -> None:
    assert migrate.migrations_dir() == ROOT / "migrations"
    assert migrate.head() == "0004"


async def test_upgrade_to_head_then_downgrade_to_base(db_url: str) -> None:
    assert await migrate.current(db_url) is None

    await migrate.upgrade(db_url)
    assert await migrate.current(db_url) == migrate.head()
    schema = await _inspect(db_url, _schema)
    assert schema["tables"] == {
        "usage_events",
        "usage_hourly",
        "teams",
        "api_keys",
        "prices",
        "audit_log",
        "tenancy_state",
        migrate.VERSION_TABLE,
    }
    assert schema["indexes"] == EXPECTED_INDEXES
    assert schema["rollup_indexes"] == EXPECTED_ROLLUP_INDEXES
    assert await _inspect(db_url, _diff_against_models) == []

    await migrate.upgrade(db_url)  # already at head: a no-op, not an error
    assert await migrate.current(db_url) == migrate.head()

    await migrate.downgrade(db_url, "base")
    assert await migrate.current(db_url) is None
    assert (await _inspect(db_url, _schema))["tables"] == {migrate.VERSION_TABLE}

    await migrate.upgrade(db_url, "0001")  # and back up again
    assert await migrate.current(db_url) == "0001"


def test_alembic_command_api_without_a_connection_builds_its_own_engine(db_sqlite_url: str) -> None:
    # The path the `alembic` command line takes: env.py gets only a URL and runs its own event loop.
    command.upgrade(migrate.alembic_config(db_sqlite_url), "head")
    command.downgrade(migrate.alembic_config(db_sqlite_url), "base")
    command.upgrade(migrate.alembic_config(db_sqlite_url), "head")


async def test_current_after_cli_style_upgrade(db_sqlite_url: str) -> None:
    await migrate.upgrade(db_sqlite_url)
    assert await migrate.current(db_sqlite_url) == migrate.head()


def test_offline_mode_emits_postgresql_ddl() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        command.upgrade(migrate.alembic_config("postgresql://nobody@127.0.0.1:1/meter"), "head", sql=True)
    sql = out.getvalue()
    assert "CREATE TABLE usage_events" in sql
    assert "started_at TIMESTAMP WITH TIME ZONE NOT NULL" in sql
    assert "upstream_metrics JSONB NOT NULL" in sql
    assert "CREATE INDEX ix_usage_events_team_started_at ON usage_events (team, started_at)" in sql
