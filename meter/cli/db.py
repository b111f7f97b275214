"""``meter db upgrade|downgrade``: the database schema's migrations (alembic, :mod:`meter.db.migrate`)."""

from __future__ import annotations

import click

from meter.cli.context import cli_settings, database_option, run_on_database


@click.group()
def db() -> None:
    """Database migrations."""


@db.command("upgrade")
@click.argument("revision", default="head")
@database_option
def db_upgrade(revision: str, database_url: str | None) -> None:
    """Migrate the database up to REVISION (default: head)."""
    from meter.db.migrate import upgrade

    settings = cli_settings(database_url=database_url)
    run_on_database(settings.database_url, upgrade(settings.database_url, revision))
    click.echo(f"database at {revision}")


@db.command("downgrade")
@click.argument("revision")
@database_option
def db_downgrade(revision: str, database_url: str | None) -> None:
    """Migrate the database down to REVISION ('base' removes every table)."""
    from meter.db.migrate import downgrade

    settings = cli_settings(database_url=database_url)
    run_on_database(settings.database_url, downgrade(settings.database_url, revision))
    click.echo(f"database at {revision}")
