"""The admin API under ``/admin/v1``: reading usage.

Access: ``Authorization: Bearer $METER_ADMIN_TOKEN``, compared in constant time. With no admin token
configured every admin endpoint answers 403 and says how to enable it; a missing or wrong token gets
401. Errors use the OpenAI error shape like everything else meter answers.

The API's OpenAPI schema (``/admin/schema``, ``/admin/schema/openapi.json``, ``.yaml``) is behind the
same guard (:func:`openapi_config`): it maps the whole admin surface. meter serves no documentation
page: such pages load their scripts from third-party hosts; load the schema into your own Swagger UI
or Redoc instead.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, date, datetime
from typing import Any

from litestar import Request, Response, get
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin
from litestar.router import Router
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.queries import GROUPS, recent_requests, usage_summary
from meter.errors import AuthenticationError, MeterError, PermissionDenied, RequestError, error_body


def parse_time(value: str | None, name: str) -> datetime | None:
    """ISO 8601 date or datetime; naive values are UTC."""
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        try:
            parsed = datetime.combine(date.fromisoformat(value), datetime.min.time())
        except ValueError:
            raise RequestError(
                f"{name} must be an ISO 8601 date or datetime, got {value!r}", param=name
            ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_group_by(value: str | None) -> list[str]:
    if not value:
        return []
    groups = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise RequestError(
            f"cannot group by {unknown[0]!r}; choose from {', '.join(GROUPS)}", param="group_by"
        )
    return groups


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


async def require_admin(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    expected: str | None = connection.app.state.admin_token
    if not expected:
        raise PermissionDenied(
            "the admin API is disabled: start meter with METER_ADMIN_TOKEN set to a secret token and send "
            "it as 'Authorization: Bearer <token>'"
        )
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # Compare fixed-length digests: compare_digest's time is then independent of both where the tokens
    # differ and how long the presented one is.
    if scheme.lower() != "bearer" or not hmac.compare_digest(_digest(token.strip()), _digest(expected)):
        raise AuthenticationError("missing or invalid admin token", param=None)


def meter_error_handler(_: Request[Any, Any, Any], exc: MeterError) -> Response[bytes]:
    return Response(exc.body(), status_code=exc.status_code, media_type="application/json")


def http_error_handler(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    error_type = "invalid_request_error" if exc.status_code < 500 else "api_error"
    return Response(
        error_body(str(exc.detail), error_type, None, None),
        status_code=exc.status_code,
        media_type="application/json",
    )


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
    engine: AsyncEngine = request.app.state.engine
    rows = await usage_summary(
        engine,
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
    if not 1 <= limit <= 10_000:
        raise RequestError("limit must be between 1 and 10000", param="limit")
    engine: AsyncEngine = request.app.state.engine
    rows = await recent_requests(
        engine,
        limit=limit,
        key_fingerprint=key,
        model=model,
        outcome=outcome,
        since=parse_time(since, "since"),
    )
    return {"object": "list", "data": rows}


def admin_router() -> Router:
    return Router(path="/admin/v1", route_handlers=[usage, requests_], guards=[require_admin], tags=["admin"])


def openapi_config(version: str) -> OpenAPIConfig:
    """The admin API's OpenAPI schema: JSON at ``/admin/schema`` and ``/admin/schema/openapi.json``,
    YAML at ``/admin/schema/openapi.yaml``, behind :func:`require_admin`; no HTML page (module doc)."""
    return OpenAPIConfig(
        title="meter admin API",
        version=version,
        render_plugins=[JsonRenderPlugin(), YamlRenderPlugin()],
        openapi_router=Router(
            path="/admin/schema", route_handlers=[], guards=[require_admin], include_in_schema=False
        ),
    )
