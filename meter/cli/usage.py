"""``meter usage``: usage totals over a time range, as the admin API's ``GET /admin/v1/usage`` gives
them (:func:`meter.db.queries.usage_summary`), as a table, CSV or JSON."""

from __future__ import annotations

from typing import Any

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.cli.context import (
    FORMAT,
    cli_settings,
    database_option,
    echo_rows,
    option_errors,
    parse_time_option,
    run_on_engine,
)


@click.command()
@click.option("--since", default=None, help="Start of the range (ISO date or datetime, UTC if no offset).")
@click.option("--until", default=None, help="End of the range, exclusive.")
@click.option(
    "--group-by",
    default="key,model",
    show_default=True,
    help="Comma-separated: any of key, team, model, endpoint, day.",
)
@click.option("--key", default=None, help="Only this key fingerprint.")
@click.option("--team", default=None, help="Only this team.")
@click.option("--model", default=None, help="Only this requested model.")
@click.option("--endpoint", default=None, help="Only this endpoint path.")
@click.option("--format", "fmt", type=FORMAT, default="table", show_default=True)
@database_option
def usage(
    since: str | None,
    until: str | None,
    group_by: str,
    key: str | None,
    team: str | None,
    model: str | None,
    endpoint: str | None,
    fmt: str,
    database_url: str | None,
) -> None:
    """Usage totals over a time range."""
    from meter.db.queries import usage_summary
    from meter.report_params import parse_group_by

    settings = cli_settings(database_url=database_url)
    with option_errors("--group-by"):
        groups = parse_group_by(group_by)
    start, end = parse_time_option(since, "since"), parse_time_option(until, "until")

    async def action(engine: AsyncEngine, settings: Any) -> list[dict[str, Any]]:
        return await usage_summary(
            engine,
            since=start,
            until=end,
            group_by=groups,
            key_fingerprint=key,
            team=team,
            model=model,
            endpoint=endpoint,
        )

    echo_rows(run_on_engine(settings, action), fmt)
