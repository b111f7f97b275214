"""``meter prices``: the price catalog from the command line.

``prices list`` and ``prices lookup`` read the catalog a server would
(:func:`meter.cli.context.load_catalog`); ``prices set`` and ``prices import`` add rows through the
same store as the admin API, audited as ``cli:<user>``. A corrected price reaches stored costs with
``meter billing rerate`` (:mod:`meter.cli.billing`).
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


@click.group()
def prices() -> None:
    """Prices: list the catalog, add rows, look up what applies."""


@prices.command("list")
@click.option("--model", default=None, help="Only this model (or tier:<name>).")
@format_option
@database_option
def prices_list(model: str | None, fmt: str, database_url: str | None) -> None:
    """Every price row: shipped sheet, price file, database (USD per 1M tokens)."""
    from meter.billing.catalog import listing

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await load_catalog(engine, settings)

    rows = listing(run_action(database_url, action), model)
    echo_rows([{k: v for k, v in row.items() if k not in ("object", "id")} for row in rows], fmt)


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
