"""Who may use the admin API, and the shape of its errors.

Access: ``Authorization: Bearer $METER_ADMIN_TOKEN``, compared in constant time (:func:`require_admin`,
the guard of every admin router and of the OpenAPI schema). With no admin token configured every admin
endpoint answers 403 and says how to enable it; a missing or wrong token gets 401.

Errors use the OpenAI error shape like everything else meter answers: a :class:`~meter.errors.MeterError`
with its own status (:func:`meter_error_handler`), litestar's own HTTP errors (unknown path, bad path
parameter, malformed body) as ``invalid_request_error`` or ``api_error`` (:func:`http_error_handler`).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException
from litestar.handlers.base import BaseRouteHandler

from meter.errors import AuthenticationError, MeterError, PermissionDenied, error_body


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
