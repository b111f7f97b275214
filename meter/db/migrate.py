"""Schema migrations, driven from code: no alembic.ini is needed at runtime.

The Alembic scripts live in the top-level ``migrations/`` directory of the repository, which the
wheel ships as ``meter/_migrations``; :func:`migrations_dir` finds whichever exists.

Invariants:

Rule 1: each command runs on one connection of meter's own async engine inside one transaction
        (``AsyncConnection.run_sync`` hands Alembic a sync connection), so on PostgreSQL a failed
        upgrade leaves the schema as it was. SQLite commits DDL as it goes; a failure there can
        leave a partial revision, which Alembic's version table makes visible.
Rule 2: concurrent upgrades from several replicas are serialised by env.py's advisory lock.

Failure policy: errors propagate. Migrating is a start-up step, and an unmigrated database must stop
the process rather than let it run against a schema it does not understand.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection

from meter.db.engine import create_engine, normalize_url

if TYPE_CHECKING:
    from alembic.config import Config

# alembic is imported inside the functions: it costs ~9 MB of memory, and a serving process that
# does not migrate (PostgreSQL, or SQLite migrated by `meter serve` before it starts) never needs it.

VERSION_TABLE = "meter_alembic_version"  # keep in step with migrations/env.py


def migrations_dir() -> Path:
    """``meter/_migrations`` in an installed wheel, else ``<repo>/migrations`` (editable install)."""
    package_root = Path(__file__).resolve().parent.parent
    for candidate in (package_root / "_migrations", package_root.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(
        f"no Alembic migrations under {package_root / '_migrations'} or {package_root.parent}"
    )


def alembic_config(url: str | None = None) -> Config:
    """An Alembic :class:`Config` built in code. ``url`` goes in ``attributes``, not the ini options,
    because ConfigParser would treat a ``%`` in a password as interpolation."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        config.attributes["url"] = normalize_url(url)
    return config


def head() -> str:
    """The newest revision the shipped migrations define."""
    from alembic.script import ScriptDirectory

    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if revision is None:  # pragma: no cover - only if versions/ were empty
        raise RuntimeError("the migration scripts define no revision")
    return revision


async def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision``."""
    from alembic import command

    await _run(url, lambda config: command.upgrade(config, revision))


async def downgrade(url: str, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision`` (``"base"`` removes every table)."""
    from alembic import command

    await _run(url, lambda config: command.downgrade(config, revision))


async def current(url: str) -> str | None:
    """The revision the database at ``url`` is at, or ``None`` if it was never migrated."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_current_revision)
    finally:
        await engine.dispose()


def _current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


async def _run(url: str, action: Callable[[Config], None]) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_with_connection, alembic_config(url), action)
    finally:
        await engine.dispose()


def _with_connection(connection: Connection, config: Config, action: Callable[[Config], None]) -> None:
    config.attributes["connection"] = connection
    action(config)
