"""The admin API's audit log, under ``/admin/v1``: ``GET /audit?limit=&since=&target=``, every admin
write (from the API or the CLI), newest first."""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from meter.admin.context import check_limit, tenancy
from meter.report_params import parse_time


@get("/audit")
async def audit(
    request: Request[Any, Any, Any], limit: int = 100, since: str | None = None, target: str | None = None
) -> dict[str, Any]:
    """Admin writes, newest first: who (token digest or CLI user), what, when."""
    entries = await tenancy(request).store.audit(
        limit=check_limit(limit), since=parse_time(since, "since"), target=target
    )
    return {"object": "list", "data": [entry.to_json() for entry in entries]}


ROUTES = [audit]
