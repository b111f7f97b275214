"""``meter prices`` and ``meter billing``: the price catalog and per-team billing from the command line.

Commands that price (``prices lookup``, ``billing rerate``) use the catalog a server would
(:func:`meter.cli.context.load_catalog`); ``prices set`` and ``prices import`` add rows through the
same store as the admin API, audited as ``cli:<user>``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.cli.context import (
    actor,
    database_option,
    echo_rows,
    format_option,
    load_catalog,
    open_store,
    parse_time_option,
    run_action,
)
from meter.errors import MeterError

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
    from meter.billing.catalog import row_to_json

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await load_catalog(engine, settings)

    catalog = run_action(database_url, action)
    rows = []
    for origin in ("sheet", "file", "db"):
        for row in catalog.sources[origin]:
            if model is None or row.model == model:
                data = row_to_json(row, catalog.ref(row))
                del data["object"], data["id"]
                rows.append(data)
    echo_rows(rows, fmt)


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
    start = parse_time_option(effective_from, "effective_from")
    assert start is not None

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await open_store(engine, settings).add_price(
            actor(),
            model=model,
            input=input_price,
            output=output_price,
            cached_input=cached_input,
            effective_from=start,
            source=source,
        )

    row = run_action(database_url, action)
    click.echo(f"price db:{row.id} for {row.model} from {row.effective_from.isoformat()}")


@prices.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@database_option
def prices_import(path: str, database_url: str | None) -> None:
    """Add every row of a price file (the shipped sheet's TOML layout) to the database."""
    from meter.billing.prices import load_price_file

    try:
        rows = load_price_file(path)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None

    async def action(engine: AsyncEngine, settings: Any) -> int:
        store = open_store(engine, settings)
        for row in rows:
            await store.add_price(
                actor(),
                model=row.model,
                input=row.price.input,
                output=row.price.output,
                cached_input=row.price.cached_input,
                effective_from=row.effective_from,
                source=row.source or path,
            )
        return len(rows)

    click.echo(f"{run_action(database_url, action)} price row(s) added from {path}")


@prices.command("lookup")
@click.argument("model")
@click.option("--at", default=None, help="When (default: now).")
@format_option
@database_option
def prices_lookup(model: str, at: str | None, fmt: str, database_url: str | None) -> None:
    """The price row that applies to MODEL at --at (size-tier fallback included)."""
    from meter.billing.catalog import row_to_json

    moment = parse_time_option(at, "at") or datetime.now(UTC)

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await load_catalog(engine, settings)

    catalog = run_action(database_url, action)
    row = catalog.lookup(model, moment)
    if row is None:
        raise click.ClickException(
            f"no price applies to {model!r} at {moment.isoformat()}: its usage is unpriced"
        )
    data = row_to_json(row, catalog.ref(row))
    del data["object"], data["id"]
    echo_rows([data], fmt)


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

    from meter.admin.manage import billing_range
    from meter.billing.ledger import billing_report

    try:
        start, end = billing_range(month, since, until)
    except MeterError as exc:
        raise click.BadParameter(exc.message) from None
    chosen = period or ("month" if month else "day")

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await billing_report(
            engine, since=start, until=end, period=chosen, team=team_name, model=model
        )

    report = run_action(database_url, action)
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
    echo_rows(rows, fmt)
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

    from meter.billing.ledger import rerate

    start, end = parse_time_option(since, "since"), parse_time_option(until, "until")
    assert start is not None and end is not None
    if start >= end:
        raise click.BadParameter("--since must be before --until")

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        catalog = await load_catalog(engine, settings)
        return await rerate(engine, catalog, since=start, until=end, dry_run=dry_run, actor=actor())

    result = run_action(database_url, action)
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
        echo_rows(changes, "table")
