"""``meter team|key|prices|billing|audit|quota``: the admin API's powers from the command line
(``quota`` lives in :mod:`meter.cli_quota`).

The commands work on the database directly (``--database`` / ``METER_DATABASE_URL``), through the same
functions as the admin API (:mod:`meter.tenancy`), and are audited with the actor ``cli:<user>``. A
running meter applies a change within its directory refresh interval (2 s by default).

Keys never appear on a command line (shell history): ``meter key register`` reads the provider key
from standard input or a hidden prompt, and ``meter key issue`` prints the new virtual key once.
Commands that price (``prices lookup``, ``billing rerate``) use the shipped sheet, the price file
(``METER_PRICE_FILE``; give the CLI the same one as the servers) and the database's rows.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.cli_quota import quota
from meter.errors import MeterError

if TYPE_CHECKING:
    from meter.tenancy.store import KeyInfo, Team

T = TypeVar("T")
FORMAT = click.Choice(["table", "json", "csv"])
_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _settings(database_url: str | None) -> Any:
    from meter.cli import _settings as cli_settings

    return cli_settings(database_url=database_url)


def _run(database_url: str | None, action: Callable[[AsyncEngine, Any], Awaitable[T]]) -> T:
    """Run ``action(engine, settings)``; a fresh SQLite database is migrated first (as ``meter usage``)."""
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

    try:
        return asyncio.run(main())
    except MeterError as exc:
        raise click.ClickException(exc.message) from None


def _store(engine: AsyncEngine, settings: Any) -> Any:
    from meter.identity import KeyFingerprinter, load_key_secret
    from meter.tenancy.credentials import load_credentials_file
    from meter.tenancy.store import TenancyStore

    credentials_file = getattr(settings, "upstream_credentials_file", None)
    names = set(load_credentials_file(credentials_file)) if credentials_file else None
    return TenancyStore(engine, KeyFingerprinter(load_key_secret(settings)), credential_names=names)


async def _catalog(engine: AsyncEngine, settings: Any) -> Any:
    from meter.pricing import default_price_rows, load_price_file
    from meter.tenancy.prices import PriceBook

    price_file = getattr(settings, "price_file", None)
    book = PriceBook(default_price_rows(), load_price_file(price_file) if price_file else [])
    async with engine.connect() as conn:
        await book.load(conn)
    return book.catalog


def _actor() -> str:
    from meter.tenancy.store import cli_actor

    return cli_actor()


def _time(value: str | None, name: str) -> datetime | None:
    from meter.admin import parse_time
    from meter.errors import RequestError

    try:
        return parse_time(value, name)
    except RequestError as exc:
        raise click.BadParameter(exc.message, param_hint=f"--{name.replace('_', '-')}") from None


def _echo(rows: list[dict[str, Any]], fmt: str) -> None:
    import json

    from meter.db.report import render

    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        click.echo(render(rows, fmt), nl=False)


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--label")
        labels[name] = value
    return labels


def _team_row(team: Team) -> dict[str, Any]:
    from meter.quota.report import limits_summary

    row = team.to_json()
    del row["object"]
    row["labels"] = ",".join(f"{k}={v}" for k, v in sorted(team.labels.items()))
    row["limits"] = limits_summary(team.limits)
    return row


def _key_row(key: KeyInfo, now: datetime) -> dict[str, Any]:
    from meter.quota.report import limits_summary

    row = key.to_json(now)
    del row["object"]
    row["limits"] = limits_summary(key.limits)
    return row


database_option = click.option(
    "--database", "database_url", default=None, help="Database URL [METER_DATABASE_URL]."
)
format_option = click.option("--format", "fmt", type=FORMAT, default="table", show_default=True)


# -- team -----------------------------------------------------------------------------------------


@click.group()
def team() -> None:
    """Teams: create, list, show, update, delete."""


@team.command("create")
@click.argument("name")
@click.option("--description", default="", help="Free text.")
@click.option("--label", "labels", multiple=True, metavar="NAME=VALUE", help="Repeatable.")
@click.option("--upstream-credential", default=None, help="Credential name for the team's virtual keys.")
@database_option
def team_create(
    name: str,
    description: str,
    labels: tuple[str, ...],
    upstream_credential: str | None,
    database_url: str | None,
) -> None:
    """Create team NAME."""

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await _store(engine, settings).create_team(
            _actor(),
            name,
            description=description,
            labels=_labels(labels),
            upstream_credential=upstream_credential,
        )

    created = _run(database_url, action)
    click.echo(f"team {created.name} created")


@team.command("list")
@format_option
@database_option
def team_list(fmt: str, database_url: str | None) -> None:
    """Every team."""

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await _store(engine, settings).list_teams()

    _echo([_team_row(t) for t in _run(database_url, action)], fmt)


@team.command("show")
@click.argument("name")
@format_option
@database_option
def team_show(name: str, fmt: str, database_url: str | None) -> None:
    """One team and its keys."""

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        store = _store(engine, settings)
        return await store.get_team(name), await store.list_keys(name), store.clock()

    found, keys, now = _run(database_url, action)
    if fmt == "json":
        _echo([{**found.to_json(), "keys": [k.to_json(now) for k in keys]}], "json")
        return
    _echo([_team_row(found)], fmt)
    if keys:
        click.echo()
        _echo([_key_row(k, now) for k in keys], fmt)


@team.command("update")
@click.argument("name")
@click.option("--name", "new_name", default=None, help="Rename the team (past records keep the old name).")
@click.option("--description", default=None)
@click.option(
    "--label", "labels", multiple=True, metavar="NAME=VALUE", help="Replaces all labels; repeatable."
)
@click.option("--clear-labels", is_flag=True, help="Remove every label.")
@click.option("--upstream-credential", default=None, help="Credential name for the team's virtual keys.")
@click.option(
    "--default-credential", is_flag=True, help="Use METER_UPSTREAM_API_KEY for the team's virtual keys."
)
@database_option
def team_update(
    name: str,
    new_name: str | None,
    description: str | None,
    labels: tuple[str, ...],
    clear_labels: bool,
    upstream_credential: str | None,
    default_credential: bool,
    database_url: str | None,
) -> None:
    """Change team NAME."""
    if upstream_credential is not None and default_credential:
        raise click.UsageError("give --upstream-credential or --default-credential, not both")
    kwargs: dict[str, Any] = {}
    if upstream_credential is not None or default_credential:
        kwargs["upstream_credential"] = upstream_credential
    new_labels = {} if clear_labels else (_labels(labels) if labels else None)

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await _store(engine, settings).update_team(
            _actor(), name, new_name=new_name, description=description, labels=new_labels, **kwargs
        )

    updated = _run(database_url, action)
    click.echo(f"team {updated.name} updated")


@team.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also when the team has active keys (they stop working).")
@database_option
def team_delete(name: str, force: bool, database_url: str | None) -> None:
    """Delete team NAME and its key registrations (past usage keeps the name)."""

    async def action(engine: AsyncEngine, settings: Any) -> int:
        removed: int = await _store(engine, settings).delete_team(_actor(), name, force=force)
        return removed

    removed = _run(database_url, action)
    click.echo(f"team {name} deleted ({removed} key registration(s) removed)")


# -- key ------------------------------------------------------------------------------------------


def _expiry(expires_in: str | None, expires_at: str | None) -> datetime | None:
    if expires_in is not None and expires_at is not None:
        raise click.UsageError("give --expires-in or --expires-at, not both")
    if expires_at is not None:
        return _time(expires_at, "expires_at")
    if expires_in is None:
        return None
    match = _DURATION.fullmatch(expires_in.strip())
    if match is None:
        raise click.BadParameter("use a number and a unit: 90m, 12h, 30d", param_hint="--expires-in")
    return datetime.now(UTC) + timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


@click.group()
def key() -> None:
    """Keys: issue virtual keys, register passthrough keys, list, revoke, move."""


@key.command("issue")
@click.argument("team_name", metavar="TEAM")
@click.option("--name", default="", help="A label for the key.")
@click.option("--expires-in", default=None, help="e.g. 90m, 12h, 30d.")
@click.option("--expires-at", default=None, help="ISO date or datetime (UTC if no offset).")
@database_option
def key_issue(
    team_name: str, name: str, expires_in: str | None, expires_at: str | None, database_url: str | None
) -> None:
    """Issue a virtual key (mk-...) for TEAM. It is printed once and cannot be shown again."""
    expiry = _expiry(expires_in, expires_at)

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await _store(engine, settings).issue_virtual_key(
            _actor(), team_name, name=name, expires_at=expiry
        )

    issued = _run(database_url, action)
    click.echo(
        f"key id {issued.info.id} for team {team_name} ({issued.info.suffix}); store it now, it is not kept:",
        err=True,
    )
    click.echo(issued.key)


@key.command("register")
@click.argument("team_name", metavar="TEAM")
@click.option("--fingerprint", default=None, help="Register by fingerprint instead of by value.")
@click.option("--suffix", default=None, help="With --fingerprint: the display suffix (...abcd).")
@click.option("--name", default="", help="A label for the key.")
@database_option
def key_register(
    team_name: str, fingerprint: str | None, suffix: str | None, name: str, database_url: str | None
) -> None:
    """Register a provider key to TEAM: its usage is attributed to TEAM, the key is forwarded as is.

    Without --fingerprint the key is read from standard input (or a hidden prompt) and only its
    fingerprint is stored."""
    value: str | None = None
    if fingerprint is None:
        if sys.stdin.isatty():
            value = click.prompt("provider key", hide_input=True)
        else:
            value = sys.stdin.readline().strip()
        if not value:
            raise click.UsageError("no key given on standard input")

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await _store(engine, settings).register_passthrough_key(
            _actor(), team_name, key=value, fingerprint=fingerprint, suffix=suffix, name=name
        )

    info = _run(database_url, action)
    click.echo(f"key id {info.id} ({info.suffix or info.fingerprint[:12]}) registered to team {team_name}")


@key.command("list")
@click.option("--team", "team_name", default=None, help="Only this team's keys.")
@format_option
@database_option
def key_list(team_name: str | None, fmt: str, database_url: str | None) -> None:
    """Keys: id, team, kind, suffix, status, created, expires, last used."""

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        store = _store(engine, settings)
        return await store.list_keys(team_name), store.clock()

    keys, now = _run(database_url, action)
    _echo([_key_row(k, now) for k in keys], fmt)


@key.command("revoke")
@click.argument("key_id", type=int)
@database_option
def key_revoke(key_id: int, database_url: str | None) -> None:
    """Revoke key KEY_ID: requests with it get 401 within seconds."""

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await _store(engine, settings).revoke_key(_actor(), key_id)

    info = _run(database_url, action)
    click.echo(f"key id {info.id} ({info.suffix}) of team {info.team} revoked")


@key.command("move")
@click.argument("key_id", type=int)
@click.argument("team_name", metavar="TEAM")
@database_option
def key_move(key_id: int, team_name: str, database_url: str | None) -> None:
    """Attribute key KEY_ID's future usage to TEAM (past records keep their team)."""

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await _store(engine, settings).move_key(_actor(), key_id, team_name)

    info = _run(database_url, action)
    click.echo(f"key id {info.id} ({info.suffix}) now belongs to team {info.team}")


# -- prices ---------------------------------------------------------------------------------------


@click.group()
def prices() -> None:
    """Prices: list the catalog, add rows, look up what applies."""


@prices.command("list")
@click.option("--model", default=None, help="Only this model (or tier:<name>).")
@format_option
@database_option
def prices_list(model: str | None, fmt: str, database_url: str | None) -> None:
    """Every price row: shipped sheet, price file, database (USD per 1M tokens)."""
    from meter.tenancy.prices import row_to_json

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await _catalog(engine, settings)

    catalog = _run(database_url, action)
    rows = []
    for origin in ("sheet", "file", "db"):
        for row in catalog.sources[origin]:
            if model is None or row.model == model:
                data = row_to_json(row, catalog.ref(row))
                del data["object"], data["id"]
                rows.append(data)
    _echo(rows, fmt)


@prices.command("set")
@click.argument("model")
@click.option("--input", "input_price", required=True, help="USD per 1M input tokens, e.g. 0.20.")
@click.option("--output", "output_price", required=True, help="USD per 1M output tokens.")
@click.option("--cached-input", default=None, help="USD per 1M cached input tokens (default: --input).")
@click.option("--effective-from", required=True, help="ISO date or datetime the price applies from.")
@click.option("--source", default="", help="Where the price comes from (contract, invoice, ...).")
@database_option
def prices_set(
    model: str,
    input_price: str,
    output_price: str,
    cached_input: str | None,
    effective_from: str,
    source: str,
    database_url: str | None,
) -> None:
    """Add a price row for MODEL (or tier:<name>) from --effective-from on. To correct a price, add
    a row with the same model and --effective-from, then run `meter billing rerate`."""
    start = _time(effective_from, "effective_from")
    assert start is not None

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await _store(engine, settings).add_price(
            _actor(),
            model=model,
            input=input_price,
            output=output_price,
            cached_input=cached_input,
            effective_from=start,
            source=source,
        )

    row = _run(database_url, action)
    click.echo(f"price db:{row.id} for {row.model} from {row.effective_from.isoformat()}")


@prices.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@database_option
def prices_import(path: str, database_url: str | None) -> None:
    """Add every row of a price file (the shipped sheet's TOML layout) to the database."""
    from meter.pricing import load_price_file

    try:
        rows = load_price_file(path)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None

    async def action(engine: AsyncEngine, settings: Any) -> int:
        store = _store(engine, settings)
        for row in rows:
            await store.add_price(
                _actor(),
                model=row.model,
                input=row.price.input,
                output=row.price.output,
                cached_input=row.price.cached_input,
                effective_from=row.effective_from,
                source=row.source or path,
            )
        return len(rows)

    click.echo(f"{_run(database_url, action)} price row(s) added from {path}")


@prices.command("lookup")
@click.argument("model")
@click.option("--at", default=None, help="When (default: now).")
@format_option
@database_option
def prices_lookup(model: str, at: str | None, fmt: str, database_url: str | None) -> None:
    """The price row that applies to MODEL at --at (size-tier fallback included)."""
    from meter.tenancy.prices import row_to_json

    moment = _time(at, "at") or datetime.now(UTC)

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await _catalog(engine, settings)

    catalog = _run(database_url, action)
    row = catalog.lookup(model, moment)
    if row is None:
        raise click.ClickException(
            f"no price applies to {model!r} at {moment.isoformat()}: its usage is unpriced"
        )
    data = row_to_json(row, catalog.ref(row))
    del data["object"], data["id"]
    _echo([data], fmt)


# -- billing --------------------------------------------------------------------------------------


@click.group()
def billing() -> None:
    """Billing: per-team reports, re-rating after a price correction."""


@billing.command("report")
@click.option("--month", default=None, help="A calendar month (UTC), e.g. 2026-11.")
@click.option("--since", default=None, help="Start (ISO date or datetime, UTC if no offset).")
@click.option("--until", default=None, help="End, exclusive.")
@click.option(
    "--period",
    type=click.Choice(["day", "month"]),
    default=None,
    help="Default: month with --month, else day.",
)
@click.option("--team", "team_name", default=None, help="Only this team.")
@click.option("--model", default=None, help="Only this requested model.")
@format_option
@database_option
def billing_report_command(
    month: str | None,
    since: str | None,
    until: str | None,
    period: str | None,
    team_name: str | None,
    model: str | None,
    fmt: str,
    database_url: str | None,
) -> None:
    """Requests, tokens by type and cost per team, model and day or month. The total is the exact sum
    of the per-request costs (each rounded once to 1e-9 USD)."""
    import json

    from meter.admin_manage import billing_range
    from meter.tenancy.ledger import billing_report

    try:
        start, end = billing_range(month, since, until)
    except MeterError as exc:
        raise click.BadParameter(exc.message) from None
    chosen = period or ("month" if month else "day")

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await billing_report(
            engine, since=start, until=end, period=chosen, team=team_name, model=model
        )

    report = _run(database_url, action)
    if fmt == "json":
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    rows = [line.to_row() for line in report.lines]
    if fmt == "table":
        rows.append(
            {
                "period": "total",
                "team": "",
                "model": "",
                "requests": sum(line.requests for line in report.lines),
                "cost_usd": report.total_usd,
                "unpriced_requests": report.unpriced_requests,
            }
        )
    _echo(rows, fmt)
    if fmt == "table" and report.unpriced_requests:
        click.echo(
            f"{report.unpriced_requests} request(s) used tokens but had no price: they are not in the "
            "total; add prices (meter prices set) and run meter billing rerate",
            err=True,
        )


@billing.command("rerate")
@click.option("--since", required=True, help="Start (ISO date or datetime, UTC if no offset).")
@click.option("--until", required=True, help="End, exclusive.")
@click.option("--dry-run", is_flag=True, help="Only report what would change.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@database_option
def billing_rerate(since: str, until: str, dry_run: bool, fmt: str, database_url: str | None) -> None:
    """Recompute the cost of every stored request in [--since, --until) with the current prices and
    correct the hourly rollups. Idempotent: a second run changes nothing."""
    import json

    from meter.tenancy.ledger import rerate

    start, end = _time(since, "since"), _time(until, "until")
    assert start is not None and end is not None
    if start >= end:
        raise click.BadParameter("--since must be before --until")

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        catalog = await _catalog(engine, settings)
        return await rerate(engine, catalog, since=start, until=end, dry_run=dry_run, actor=_actor())

    result = _run(database_url, action)
    if fmt == "json":
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    verb = "would change" if dry_run else "changed"
    click.echo(
        f"examined {result.examined} request(s); {verb} {result.changed} "
        f"({result.newly_priced} newly priced, {result.newly_unpriced} newly unpriced); "
        f"total delta {result.delta_usd} USD"
    )
    changes = result.to_json()["changes"]
    if changes:
        _echo(changes, "table")


# -- audit ----------------------------------------------------------------------------------------


@click.command()
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--since", default=None)
@click.option("--target", default=None, help="e.g. team:search, key:12, price:3.")
@format_option
@database_option
def audit(limit: int, since: str | None, target: str | None, fmt: str, database_url: str | None) -> None:
    """Admin changes, newest first: when, who, what."""
    start = _time(since, "since")

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await _store(engine, settings).audit(limit=limit, since=start, target=target)

    entries = _run(database_url, action)
    _echo([entry.to_json() for entry in entries], fmt)


COMMANDS = (team, key, prices, billing, audit, quota)
