"""Alembic environment for meter's schema (shipped in the wheel as ``meter/_migrations``).

Three ways in, in order of preference:

1. ``config.attributes["connection"]``: a sync ``Connection`` already inside a transaction, as
   :mod:`meter.db.migrate` passes from ``AsyncConnection.run_sync``. The caller owns the transaction.
2. ``config.attributes["url"]`` or the ``sqlalchemy.url`` option: env.py builds an async engine with
   :func:`meter.db.engine.create_engine` (so ``sqlite://`` / ``postgresql://`` URLs work) and runs
   the migrations through ``run_sync``. This is what the ``alembic`` command line uses.
3. Offline mode (``alembic upgrade --sql``): SQL is emitted for the URL's dialect, nothing connects.

Invariants: revisions are applied under a PostgreSQL transaction-scoped advisory lock, so replicas
starting together run each migration once; the version table is ``meter_alembic_version`` so meter
can share a database with another application that uses Alembic.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from meter.db.engine import create_engine, normalize_url
from meter.db.models import Base

VERSION_TABLE = "meter_alembic_version"
# Any constant works; it only has to be the same in every meter process (ASCII "meter").
MIGRATION_LOCK_ID = 0x6D65746572

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: set config.attributes['url'] or the sqlalchemy.url option")
    return normalize_url(str(url))


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTERs need table rebuilds
        compare_type=True,
    )


def _run_with(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        context.run_migrations()


async def _run_with_url() -> None:
    engine = create_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_with)
            await connection.commit()
    finally:
        await engine.dispose()


def run_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
    else:
        asyncio.run(_run_with_url())


if context.is_offline_mode():
    run_offline()
else:
    run_online()
