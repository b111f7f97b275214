"""The admin API for the price catalog, under ``/admin/v1``:

* ``GET /prices[?model=]``: every row of the catalog (shipped sheet, price file, database)
* ``POST /prices``: add a database row, in force from its ``effective_from``
* ``GET /prices/lookup?model=&at=``: the row that prices a model at a moment

Prices are USD per 1M tokens as decimal strings. A correction is a new row; re-rating the affected
range is :mod:`meter.admin.billing`'s ``POST /billing/rerate``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from litestar import Request, get, post

from meter.admin.context import actor, aware, tenancy
from meter.billing.catalog import listing, row_to_json
from meter.errors import NotFound
from meter.report_params import parse_time


class PriceCreate(msgspec.Struct, forbid_unknown_fields=True):
    model: str  # a model name or "tier:<name>"
    input: str  # USD per 1M tokens, as a decimal string
    output: str
    effective_from: datetime
    cached_input: str | None = None
    source: str = ""


@get("/prices")
async def list_prices(request: Request[Any, Any, Any], model: str | None = None) -> dict[str, Any]:
    """Every price row of the catalog (shipped sheet, price file, database), or one model's."""
    return {"object": "list", "data": listing(tenancy(request).prices.catalog, model)}


@post("/prices", status_code=201)
async def add_price(request: Request[Any, Any, Any], data: PriceCreate) -> dict[str, Any]:
    """Add a price row, in force from ``effective_from``. A correction is a new row with the same
    model and effective_from; then re-rate the affected range (``POST /billing/rerate``)."""
    found = tenancy(request)
    effective_from = aware(data.effective_from, "effective_from")
    assert effective_from is not None
    row = await found.store.add_price(
        actor(request),
        model=data.model,
        input=data.input,
        output=data.output,
        cached_input=data.cached_input,
        effective_from=effective_from,
        source=data.source,
    )
    return row_to_json(row, found.prices.catalog.ref(row))


@get("/prices/lookup")
async def lookup_price(request: Request[Any, Any, Any], model: str, at: str | None = None) -> dict[str, Any]:
    """The row that prices ``model`` at ``at`` (default: now), size-tier fallback included."""
    found = tenancy(request)
    moment = parse_time(at, "at") or found.store.clock()
    catalog = found.prices.catalog
    row = catalog.lookup(model, moment)
    if row is None:
        raise NotFound(
            f"no price applies to {model!r} at {moment.isoformat()}: its usage is unpriced", param="model"
        )
    return row_to_json(row, catalog.ref(row))


ROUTES = [list_prices, add_price, lookup_price]
