"""Operator price rows in the database, and the price catalog a meter process prices records with.

The catalog is the shipped Fireworks sheet (``meter/billing/data/fireworks_prices.toml``), then the price file
(``METER_PRICE_FILE``, validated at start), then the ``prices`` table, merged by
:class:`meter.billing.rating.PricedCatalog` (Rule 5 there: later sources win from their
``effective_from`` on).

Rule 1: a price is USD per 1M tokens with at most 9 decimal places, stored as integer nano-USD per 1M
        (meter.db.tenancy_models, Rule 3); input that does not fit is refused, never rounded.
Rule 2: rows are only ever added (a correction is a new row with the same model and effective_from),
        each addition audited and bumping the tenancy version so every replica reloads its catalog.
Rule 3: ``tier:<name>`` rows must name one of Fireworks' size tiers (:func:`meter.billing.prices.size_tier`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from meter.billing.prices import Price, PriceRow, from_nanos, to_nanos
from meter.billing.rating import TIER_PREFIX, PricedCatalog
from meter.db.tenancy_models import prices
from meter.errors import RequestError
from meter.tenancy.audit import Clock, record_change, utc_now

TIERS: tuple[str, ...] = (
    "under-4b",
    "4b-16b",
    "over-16b",
    "moe-up-to-56b",
    "moe-56b-176b",
    "embedding-up-to-150m",
    "embedding-150m-350m",
)
MAX_PRICE = Decimal(1_000_000)  # USD per 1M tokens: anything above is a typo


def parse_usd(value: Any, param: str) -> Decimal:
    """A price as given by an operator (a string or an integer, never a float): Rule 1."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise RequestError(f'{param} must be a decimal string such as "0.20"', param=param)
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise RequestError(f"{param} {value!r} is not a number", param=param) from None
    if not number.is_finite() or number < 0 or number > MAX_PRICE:
        raise RequestError(f"{param} must be between 0 and {MAX_PRICE} USD per 1M tokens", param=param)
    try:
        to_nanos(number)
    except ValueError:
        raise RequestError(f"{param} {value!r} has more than 9 decimal places", param=param) from None
    return number


def check_model(model: Any) -> str:
    if not isinstance(model, str) or not model.strip() or len(model) > 256 or model != model.strip():
        raise RequestError("model must be a non-empty name of at most 256 characters", param="model")
    if model.startswith(TIER_PREFIX) and model[len(TIER_PREFIX) :] not in TIERS:
        raise RequestError(f"unknown tier {model!r}; tiers: {', '.join(TIERS)}", param="model")
    return model


def row_to_json(row: PriceRow, ref: str) -> dict[str, Any]:
    price = row.price
    return {
        "object": "price",
        "id": row.id,
        "ref": ref,
        "model": row.model,
        "input": str(price.input),
        "cached_input": None if price.cached_input is None else str(price.cached_input),
        "output": str(price.output),
        "effective_from": row.effective_from.isoformat(),
        "source": row.source,
    }


def listing(catalog: PricedCatalog, model: str | None = None) -> list[dict[str, Any]]:
    """Every row of the catalog as JSON (shipped sheet, price file, database, in that order), or only
    ``model``'s: what ``GET /admin/v1/prices`` and ``meter prices list`` show."""
    return [
        row_to_json(row, catalog.ref(row))
        for origin in ("sheet", "file", "db")
        for row in catalog.sources[origin]
        if model is None or row.model == model
    ]


def _usd(nanos: int) -> Decimal:
    """Stored nano-USD per 1M as the shortest exact Decimal ("0.20" comes back as 0.2, not 0.200000000)."""
    value = from_nanos(int(nanos)).normalize()
    return value.quantize(Decimal(1)) if value.as_tuple().exponent > 0 else value  # type: ignore[operator]


def _price_row(m: Any) -> PriceRow:
    cached = m["cached_input_nanos"]
    return PriceRow(
        model=m["model"],
        price=Price(
            input=_usd(m["input_nanos"]),
            output=_usd(m["output_nanos"]),
            cached_input=None if cached is None else _usd(cached),
        ),
        effective_from=m["effective_from"],
        source=m["source"],
        id=int(m["id"]),
    )


async def load_db_rows(conn: AsyncConnection) -> list[PriceRow]:
    rows = await conn.execute(select(prices).order_by(prices.c.effective_from, prices.c.id))
    return [_price_row(row._mapping) for row in rows]


async def add_price(
    engine: AsyncEngine,
    actor: str,
    *,
    model: str,
    input: Any,
    output: Any,
    cached_input: Any = None,
    effective_from: datetime,
    source: str = "",
    clock: Clock = utc_now,
) -> PriceRow:
    """Add one price row (Rules 1-3); returns it with its id."""
    model = check_model(model)
    price = Price(
        input=parse_usd(input, "input"),
        output=parse_usd(output, "output"),
        cached_input=None if cached_input is None else parse_usd(cached_input, "cached_input"),
    )
    if effective_from.tzinfo is None:
        effective_from = effective_from.replace(tzinfo=UTC)
    if not isinstance(source, str) or len(source) > 256:
        raise RequestError("source must be a string of at most 256 characters", param="source")
    now = clock()
    values = {
        "model": model,
        "input_nanos": to_nanos(price.input),
        "cached_input_nanos": None if price.cached_input is None else to_nanos(price.cached_input),
        "output_nanos": to_nanos(price.output),
        "effective_from": effective_from,
        "source": source,
        "created_at": now,
    }
    async with engine.begin() as conn:
        price_id = int(
            (await conn.execute(insert(prices).values(**values).returning(prices.c.id))).scalar_one()
        )
        detail = {
            "model": model,
            "input": str(price.input),
            "cached_input": None if price.cached_input is None else str(price.cached_input),
            "output": str(price.output),
            "effective_from": effective_from.isoformat(),
            "source": source,
        }
        await record_change(conn, now, actor, "price.add", f"price:{price_id}", detail)
    return PriceRow(model=model, price=price, effective_from=effective_from, source=source, id=price_id)


class PriceBook:
    """The current :class:`PricedCatalog` of this process: fixed sheet and file rows, database rows
    swapped in by :meth:`load` (called by the tenancy refresher). Reading :attr:`catalog` is free."""

    def __init__(self, sheet: Sequence[PriceRow], file: Sequence[PriceRow] = ()) -> None:
        self.catalog = PricedCatalog(sheet, file)

    def set_db_rows(self, rows: Sequence[PriceRow]) -> None:
        self.catalog = self.catalog.with_db_rows(rows)

    async def load(self, conn: AsyncConnection) -> None:
        self.set_db_rows(await load_db_rows(conn))
