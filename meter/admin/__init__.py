"""The admin API: one module per resource under ``/admin/v1``, assembled here for :mod:`meter.app`.

==============================  ===========================================================
:mod:`~meter.admin.usage`       ``/usage``, ``/requests``: usage totals and recent records
:mod:`~meter.admin.teams`       ``/teams``, ``/teams/{name}``
:mod:`~meter.admin.keys`        ``/teams/{name}/keys``, ``/keys``, ``/keys/{key_id}[/revoke]``
:mod:`~meter.admin.prices`      ``/prices``, ``/prices/lookup``
:mod:`~meter.admin.billing`     ``/billing``, ``/billing/rerate``
:mod:`~meter.admin.audit`       ``/audit``
:mod:`~meter.admin.quota`       ``/teams/{name}/limits``, ``/keys/{key_id}/limits``, ``/quota/status``
==============================  ===========================================================

Every route, and the OpenAPI schema, is behind one guard (:func:`meter.admin.auth.require_admin`);
errors have the OpenAI shape (:mod:`meter.admin.auth`); handlers read the app's state through
:mod:`meter.admin.context`.

The schema (``/admin/schema``, ``/admin/schema/openapi.json``, ``.yaml``) maps the whole admin surface.
meter serves no documentation page: such pages load their scripts from third-party hosts; load the
schema into your own Swagger UI or Redoc instead.
"""

from __future__ import annotations

from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin
from litestar.router import Router

from meter.admin import audit, billing, keys, prices, quota, teams, usage
from meter.admin.auth import require_admin

PREFIX = "/admin/v1"


def admin_routers() -> list[Router]:
    """The admin API's routers, to mount on the app's litestar (reading usage, and managing the rest;
    the schema's tags keep the two apart)."""
    manage = [*teams.ROUTES, *keys.ROUTES, *prices.ROUTES, *billing.ROUTES, *audit.ROUTES, *quota.ROUTES]
    return [
        Router(path=PREFIX, route_handlers=usage.ROUTES, guards=[require_admin], tags=["admin"]),
        Router(path=PREFIX, route_handlers=manage, guards=[require_admin], tags=["admin: manage"]),
    ]


def openapi_config(version: str) -> OpenAPIConfig:
    """The admin API's OpenAPI schema: JSON at ``/admin/schema`` and ``/admin/schema/openapi.json``,
    YAML at ``/admin/schema/openapi.yaml``, behind :func:`~meter.admin.auth.require_admin`; no HTML
    page (module docstring)."""
    return OpenAPIConfig(
        title="meter admin API",
        version=version,
        render_plugins=[JsonRenderPlugin(), YamlRenderPlugin()],
        openapi_router=Router(
            path="/admin/schema", route_handlers=[], guards=[require_admin], include_in_schema=False
        ),
    )
