"""The admin API for reading usage, under ``/admin/v1``: totals over a range and recent records.

* ``GET /usage?since=&until=&group_by=&key=&team=&model=&endpoint=``: totals per group
  (:func:`meter.db.queries.usage_summary`)
* ``GET /requests?limit=&key=&model=&outcome=&since=``: the newest usage records
"""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from meter.admin.context import check_limit, engine
from meter.db.queries import recent_requests, usage_summary
from meter.report_params import parse_group_by, parse_time


@get("/usage")
async def usage(
    request: Request[Any, Any, Any],
    since: str | None = None,
    until: str | None = None,
    group_by: str | None = None,
    key: str | None = None,
    team: str | None = None,
    model: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Usage totals over a time range, grouped by any of key, team, model, endpoint, day."""
    rows = await usage_summary(
        engine(request),
        since=parse_time(since, "since"),
        until=parse_time(until, "until"),
        group_by=parse_group_by(group_by),
        key_fingerprint=key,
        team=team,
        model=model,
        endpoint=endpoint,
    )
    return {"object": "list", "data": rows}


@get("/requests")
async def requests_(
    request: Request[Any, Any, Any],
    limit: int = 100,
    key: str | None = None,
    model: str | None = None,
    outcome: str | None = None,
    since: str | None = None,
) -> dict[str, Any]:
    """Recent usage records, newest first."""
    rows = await recent_requests(
        engine(request),
        limit=check_limit(limit),
        key_fingerprint=key,
        model=model,
        outcome=outcome,
        since=parse_time(since, "since"),
    )
    return {"object": "list", "data": rows}


ROUTES = [usage, requests_]
