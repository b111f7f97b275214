"""The admin API as the admin tests drive it: meter's admin routes on a litestar app of their own,
called in the test's event loop, with a known admin token."""

from __future__ import annotations

import httpx
from litestar import Litestar
from litestar.exceptions import HTTPException
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.admin import admin_routers, openapi_config
from meter.admin.auth import http_error_handler, meter_error_handler
from meter.errors import MeterError
from meter.tenancy.identity import KeyFingerprinter
from meter.tenancy.runtime import Tenancy

TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FP = KeyFingerprinter(b"0123456789abcdef0123456789abcdef")


def admin_app(engine: AsyncEngine, tenancy: Tenancy, token: str | None = TOKEN) -> Litestar:
    """The admin part of meter's litestar app, composed as meter.app does."""
    app = Litestar(
        route_handlers=admin_routers(),
        exception_handlers={MeterError: meter_error_handler, HTTPException: http_error_handler},
        openapi_config=openapi_config("test"),
        logging_config=None,
    )
    app.state.engine = engine
    app.state.tenancy = tenancy
    app.state.admin_token = token
    return app


def asgi_client(app: Litestar) -> httpx.AsyncClient:
    """In the test's own event loop (the engine's), unlike litestar's AsyncTestClient."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://meter")
