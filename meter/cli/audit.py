"""``meter audit``: the admin changes made through the admin API or the CLI, newest first (the same
log as the admin API's ``GET /admin/v1/audit``)."""

from __future__ import annotations

from typing import Any

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.cli.context import (
    database_option,
    echo_rows,
    format_option,
    open_store,
    parse_time_option,
    run_action,
)


@click.command()
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--since", default=None)
@click.option("--target", default=None, help="e.g. team:search, key:12, price:3.")
@format_option
@database_option
def audit(limit: int, since: str | None, target: str | None, fmt: str, database_url: str | None) -> None:
    """Admin changes, newest first: when, who, what."""
    start = parse_time_option(since, "since")

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await open_store(engine, settings).audit(limit=limit, since=start, target=target)

    entries = run_action(database_url, action)
    echo_rows([entry.to_json() for entry in entries], fmt)
