"""How a management command (``meter team|key|prices|billing|audit|quota``) runs: one action on the
database, through the same functions as the admin API (:mod:`meter.tenancy`), audited as ``cli:<user>``.

Rule 1: the commands work on the database directly (``--database`` / ``METER_DATABASE_URL``); a fresh
        SQLite database is migrated first (as ``meter usage``), any other is left to ``meter db
        upgrade``. A running meter applies a change within its directory refresh interval (2 s by
        default).
Rule 2: a meter error ends the command with its message (exit status 1), never a traceback; so does
        a database that cannot be reached or refuses the command, named by its masked URL
        (:func:`meter.redact.mask_url`).
Rule 3: the price catalog is built like a server's: the shipped sheet, the price file
        (``METER_PRICE_FILE``; give the CLI the same one as the servers) and the database's rows.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.errors import MeterError, SettingsError
from meter.redact import mask_url

T = TypeVar("T")
FORMAT = click.Choice(["table", "json", "csv"])


def _settings(database_url: str | None) -> Any:
    from meter.cli.main import _settings as cli_settings

    return cli_settings(database_url=database_url)


def run_action(database_url: str | None, action: Callable[[AsyncEngine, Any], Awaitable[T]]) -> T:
    """Run ``action(engine, settings)``; a fresh SQLite database is migrated first (Rule 1), a meter
    error becomes the command's error message (Rule 2)."""
    from meter.db.engine import create_engine
    from meter.db.migrate import upgrade

    settings = _settings(database_url)

    async def main() -> T:
        if settings.is_sqlite:
            await upgrade(settings.database_url)
        engine = create_engine(settings.database_url)
        try:
            return await action(engine, settings)
        finally:
            await engine.dispose()

    return run_on_database(settings.database_url, main())


# What reaching a database can raise: refused, unknown host, no answer, or the driver's own errors
# (SQLAlchemy wraps asyncpg's and sqlite3's).
DATABASE_FAILURES = (SQLAlchemyError, ConnectionError, socket.gaierror, TimeoutError)


def run_on_database(database_url: str, main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` for a command working on ``database_url``, with Rule 2's errors."""
    from meter.db.engine import describe_error

    try:
        return asyncio.run(main)
    except MeterError as exc:
        raise click.ClickException(exc.message) from None
    except SettingsError as exc:  # e.g. METER_KEY_SECRET missing, found when the store is opened
        raise click.ClickException(str(exc)) from None
    except DATABASE_FAILURES as exc:
        raise click.ClickException(f"database {mask_url(database_url)}: {describe_error(exc)}") from None


def open_store(engine: AsyncEngine, settings: Any) -> Any:
    """The tenancy store on ``engine``, checking credential names against the credentials file if set."""
    from meter.tenancy.credentials import load_credentials_file
    from meter.tenancy.identity import KeyFingerprinter, load_key_secret
    from meter.tenancy.store import TenancyStore

    credentials_file = getattr(settings, "upstream_credentials_file", None)
    names = set(load_credentials_file(credentials_file)) if credentials_file else None
    return TenancyStore(engine, KeyFingerprinter(load_key_secret(settings)), credential_names=names)


async def load_catalog(engine: AsyncEngine, settings: Any) -> Any:
    """The price catalog a server would use (Rule 3)."""
    from meter.billing.catalog import PriceBook
    from meter.billing.prices import default_price_rows, load_price_file

    price_file = getattr(settings, "price_file", None)
    book = PriceBook(default_price_rows(), load_price_file(price_file) if price_file else [])
    async with engine.connect() as conn:
        await book.load(conn)
    return book.catalog


def actor() -> str:
    """The audit actor of this command: ``cli:<user>``."""
    from meter.tenancy.audit import cli_actor

    return cli_actor()


def parse_time_option(value: str | None, name: str) -> datetime | None:
    """The time option ``--<name>`` as an aware datetime; a usage error naming the option otherwise."""
    from meter.admin.usage import parse_time
    from meter.errors import RequestError

    try:
        return parse_time(value, name)
    except RequestError as exc:
        raise click.BadParameter(exc.message, param_hint=f"--{name.replace('_', '-')}") from None


def echo_rows(rows: list[dict[str, Any]], fmt: str) -> None:
    """Print ``rows`` as a table, CSV or JSON."""
    import json

    from meter.db.report import render

    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        click.echo(render(rows, fmt), nl=False)


database_option = click.option(
    "--database", "database_url", default=None, help="Database URL [METER_DATABASE_URL]."
)
format_option = click.option("--format", "fmt", type=FORMAT, default="table", show_default=True)
