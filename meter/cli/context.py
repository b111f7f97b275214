"""What every ``meter`` command shares: settings from the environment and flags, running an action on
the database, parsing options into meter's values, and printing rows.

Each command group is one module (:mod:`meter.cli.serve`, :mod:`~meter.cli.db`, :mod:`~meter.cli.usage`,
:mod:`~meter.cli.journal`, :mod:`~meter.cli.team`, :mod:`~meter.cli.key`, :mod:`~meter.cli.prices`,
:mod:`~meter.cli.billing`, :mod:`~meter.cli.audit`, :mod:`~meter.cli.quota`) that imports from here;
:mod:`meter.cli.main` assembles them. This module imports none of them.

Rule 1: settings are read once per command, from the environment and the command's flags
        (:func:`cli_settings`); a bad value is a usage error naming the setting (exit status 2).
Rule 2: the commands work on the database directly (``--database`` / ``METER_DATABASE_URL``); a fresh
        SQLite database is migrated first, any other is left to ``meter db upgrade``. A running meter
        applies a change within its directory refresh interval (2 s by default).
Rule 3: a meter error ends the command with its message (exit status 1), never a traceback; so does
        a database that cannot be reached or refuses the command, named by its masked URL
        (:func:`meter.redact.mask_url`). A value the user gave that meter cannot parse is a usage
        error naming the option (exit status 2): :func:`option_errors` is where that happens.
Rule 4: the price catalog is built like a server's: the shipped sheet, the price file
        (``METER_PRICE_FILE``; give the CLI the same one as the servers) and the database's rows.
Rule 5: management commands are audited as ``cli:<user>`` (:func:`actor`), through the same store as
        the admin API (:mod:`meter.tenancy`).

Imports inside functions keep ``meter --help`` from loading the database engine, alembic or the
tenancy store; they are not there to break import cycles (``tests/test_import_graph.py`` counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from datetime import datetime
from typing import Any, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.errors import MeterError, RequestError, SettingsError
from meter.redact import mask_url
from meter.settings import Settings, load_settings

T = TypeVar("T")
FORMAT = click.Choice(["table", "json", "csv"])
# ``meter serve`` hands its validated settings to its worker processes in this variable
# (meter.cli.serve); a command never reads it as a setting.
WORKER_SETTINGS = "_METER_WORKER_SETTINGS"


def cli_settings(**overrides: Any) -> Settings:
    """The environment's settings with the command's flags over them (Rule 1)."""
    environ = {k: v for k, v in os.environ.items() if k != WORKER_SETTINGS}
    try:
        return load_settings(environ, **overrides)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


# What reaching a database can raise: refused, unknown host, no answer, or the driver's own errors
# (SQLAlchemy wraps asyncpg's and sqlite3's).
DATABASE_FAILURES = (SQLAlchemyError, ConnectionError, socket.gaierror, TimeoutError)


def run_on_database(database_url: str, main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` for a command working on ``database_url``, with Rule 3's errors."""
    from meter.db.engine import describe_error

    try:
        return asyncio.run(main)
    except MeterError as exc:
        raise click.ClickException(exc.message) from None
    except SettingsError as exc:  # e.g. METER_KEY_SECRET missing, found when the store is opened
        raise click.ClickException(str(exc)) from None
    except DATABASE_FAILURES as exc:
        raise click.ClickException(f"database {mask_url(database_url)}: {describe_error(exc)}") from None


def run_on_engine(settings: Settings, action: Callable[[AsyncEngine, Settings], Awaitable[T]]) -> T:
    """Run ``action(engine, settings)`` on the settings' database (Rule 2, Rule 3)."""
    from meter.db.engine import create_engine
    from meter.db.migrate import upgrade

    async def main() -> T:
        if settings.is_sqlite:
            await upgrade(settings.database_url)  # a fresh embedded database reads as empty, not as an error
        engine = create_engine(settings.database_url)
        try:
            return await action(engine, settings)
        finally:
            await engine.dispose()

    return run_on_database(settings.database_url, main())


def run_action(database_url: str | None, action: Callable[[AsyncEngine, Settings], Awaitable[T]]) -> T:
    """:func:`run_on_engine` with the settings of a command whose only flag is ``--database``."""
    return run_on_engine(cli_settings(database_url=database_url), action)


def open_store(engine: AsyncEngine, settings: Settings) -> Any:
    """The tenancy store on ``engine``, checking credential names against the credentials file if set."""
    from meter.tenancy.credentials import load_credentials_file
    from meter.tenancy.identity import KeyFingerprinter, load_key_secret
    from meter.tenancy.store import TenancyStore

    credentials_file = settings.upstream_credentials_file
    names = set(load_credentials_file(credentials_file)) if credentials_file else None
    return TenancyStore(engine, KeyFingerprinter(load_key_secret(settings)), credential_names=names)


async def load_catalog(engine: AsyncEngine, settings: Settings) -> Any:
    """The price catalog a server would use (Rule 4)."""
    from meter.billing.catalog import PriceBook
    from meter.billing.prices import default_price_rows, load_price_file

    price_file = settings.price_file
    book = PriceBook(default_price_rows(), load_price_file(price_file) if price_file else [])
    async with engine.connect() as conn:
        await book.load(conn)
    return book.catalog


def actor() -> str:
    """The audit actor of this command: ``cli:<user>`` (Rule 5)."""
    from meter.tenancy.audit import cli_actor

    return cli_actor()


@contextlib.contextmanager
def option_errors(option: str | None = None, *, by_param: Mapping[str, str] | None = None) -> Iterator[None]:
    """A :class:`~meter.errors.RequestError` raised inside (a value the user gave) becomes click's
    usage error for ``option``, or for the option ``by_param`` maps the error's ``param`` to (Rule 3)."""
    try:
        yield
    except RequestError as exc:
        hint = by_param.get(exc.param or "") if by_param is not None else option
        raise click.BadParameter(exc.message, param_hint=hint) from None


def parse_time_option(value: str | None, name: str) -> datetime | None:
    """The time option ``--<name>`` as an aware datetime (:func:`meter.report_params.parse_time`)."""
    from meter.report_params import parse_time

    with option_errors(f"--{name.replace('_', '-')}"):
        return parse_time(value, name)


def echo_rows(rows: list[dict[str, Any]], fmt: str) -> None:
    """Print ``rows`` as a table, CSV or JSON (:func:`meter.db.report.render`)."""
    from meter.db.report import render

    click.echo(render(rows, fmt), nl=False)


def echo_json(value: Any) -> None:
    """Print one JSON document, indented."""
    click.echo(json.dumps(value, indent=2))


database_option = click.option(
    "--database", "database_url", default=None, help="Database URL [METER_DATABASE_URL]."
)
format_option = click.option("--format", "fmt", type=FORMAT, default="table", show_default=True)
# For output that is not a list of flat rows (a report with totals, a status): a table or a JSON document.
table_or_json_option = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
