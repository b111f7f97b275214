"""``meter billing``: per-team billing reports, and re-rating stored costs after a price correction.

Both price with the catalog a server would (:func:`meter.cli.context.load_catalog`); ``rerate`` is
audited as ``cli:<user>``.
"""

from __future__ import annotations

from typing import Any

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.cli.context import (
    actor,
    database_option,
    echo_json,
    echo_rows,
    format_option,
    load_catalog,
    option_errors,
    parse_time_option,
    run_action,
    table_or_json_option,
)


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
    from meter.billing.ledger import billing_report
    from meter.report_params import billing_range

    with option_errors():
        start, end = billing_range(month, since, until)
    chosen = period or ("month" if month else "day")

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await billing_report(
            engine, since=start, until=end, period=chosen, team=team_name, model=model
        )

    report = run_action(database_url, action)
    if fmt == "json":
        echo_json(report.to_json())
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
@table_or_json_option
@database_option
def billing_rerate(since: str, until: str, dry_run: bool, fmt: str, database_url: str | None) -> None:
    """Recompute the cost of every stored request in [--since, --until) with the current prices and
    correct the hourly rollups. Idempotent: a second run changes nothing."""
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
        echo_json(result.to_json())
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
