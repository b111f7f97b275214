"""The admin API for billing, under ``/admin/v1``:

* ``GET /billing?month=|since=&until=&period=day|month&team=&model=``: per team by model by day or
  month (:func:`meter.billing.ledger.billing_report`)
* ``POST /billing/rerate``: recompute the stored costs of a range with the current prices
  (:func:`meter.billing.ledger.rerate`), audited
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from litestar import Request, get, post

from meter.admin.context import actor, aware, engine, tenancy
from meter.billing.ledger import billing_report, rerate
from meter.errors import RequestError
from meter.report_params import billing_range


class RerateRequest(msgspec.Struct, forbid_unknown_fields=True):
    since: datetime
    until: datetime
    dry_run: bool = False


@get("/billing")
async def billing(
    request: Request[Any, Any, Any],
    month: str | None = None,
    since: str | None = None,
    until: str | None = None,
    period: str | None = None,
    team: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Per team by model by day or month: requests, tokens by type, cost (USD, exact decimal strings),
    unpriced requests; totals are the exact sums of the per-request costs."""
    start, end = billing_range(month, since, until)
    chosen = period or ("month" if month is not None else "day")
    if chosen not in ("day", "month"):
        raise RequestError("period must be day or month", param="period")
    report = await billing_report(
        engine(request), since=start, until=end, period=chosen, team=team, model=model
    )
    return report.to_json()


@post("/billing/rerate", status_code=200)
async def rerate_range(request: Request[Any, Any, Any], data: RerateRequest) -> dict[str, Any]:
    """Recompute the cost of every stored request in ``[since, until)`` with the current prices;
    idempotent, and the answer says what changed."""
    since, until = aware(data.since, "since"), aware(data.until, "until")
    if since is None or until is None or since >= until:
        raise RequestError("since must be before until", param="since")
    found = tenancy(request)
    await found.reload()  # the newest price rows, also when another replica added them a moment ago
    result = await rerate(
        engine(request),
        found.prices.catalog,
        since=since,
        until=until,
        dry_run=data.dry_run,
        actor=actor(request),
    )
    return result.to_json()


ROUTES = [billing, rerate_range]
