"""What an admin handler reads from its request: the app's tenancy and database engine (put on
``app.state`` at start-up by :mod:`meter.app`), the audit actor of the admin token, aware datetimes and
the bounds of a listing's ``limit``.

Every write is audited with the actor ``admin:<16 hex digits of HMAC-SHA256(token) under the key
secret>`` (:func:`meter.tenancy.audit.admin_actor`): the log says which token acted without holding it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from litestar import Request
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.errors import RequestError
from meter.report_params import parse_time
from meter.tenancy.audit import admin_actor
from meter.tenancy.identity import bearer_token
from meter.tenancy.runtime import Tenancy


def tenancy(request: Request[Any, Any, Any]) -> Tenancy:
    """Teams, keys, prices and limits of this meter (:class:`meter.tenancy.Tenancy`)."""
    found: Tenancy = request.app.state.tenancy
    return found


def engine(request: Request[Any, Any, Any]) -> AsyncEngine:
    """The usage database."""
    found: AsyncEngine = request.app.state.engine
    return found


def actor(request: Request[Any, Any, Any]) -> str:
    """The audit actor of the request's admin token (module docstring)."""
    token = bearer_token(request.headers.get("authorization")) or ""
    return admin_actor(token, tenancy(request).fingerprinter)


def aware(moment: datetime | None, name: str) -> datetime | None:
    """A datetime from a request body, naive read as UTC (as :func:`meter.report_params.parse_time`)."""
    return None if moment is None else parse_time(moment.isoformat(), name)


def check_limit(limit: int) -> int:
    """``limit`` of a listing, which must be between 1 and 10000 (400 otherwise)."""
    if not 1 <= limit <= 10_000:
        raise RequestError("limit must be between 1 and 10000", param="limit")
    return limit
