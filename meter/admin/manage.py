"""The admin API for teams, keys, prices, billing and the audit log, under ``/admin/v1``.

Same access rule and error shape as :mod:`meter.admin.usage` (its ``require_admin`` guard and exception
handlers): ``Authorization: Bearer $METER_ADMIN_TOKEN``, compared in constant time. Every write is
audited with the actor ``admin:<16 hex digits of HMAC-SHA256(token) under the key secret>``
(:func:`meter.tenancy.audit.admin_actor`).

Endpoints (``{team}`` is a team name, ``{key_id}`` a key id):

* ``POST/GET /teams``, ``GET/PATCH/DELETE /teams/{team}`` (``DELETE ?force=true`` with active keys)
* ``POST/GET /teams/{team}/keys``: issue a virtual key (shown once) or register a passthrough key
* ``GET /keys[?team=]``, ``GET/PATCH /keys/{key_id}`` (PATCH moves a key to another team),
  ``POST /keys/{key_id}/revoke``
* ``GET/POST /prices``, ``GET /prices/lookup?model=&at=``
* ``GET /billing?month=|since=&until=&period=day|month&team=&model=``, ``POST /billing/rerate``
* ``GET /audit?limit=&since=&target=``
* quota limits and status: see :mod:`meter.admin.quota`

The handlers read ``app.state.tenancy`` (:class:`meter.tenancy.Tenancy`) and ``app.state.engine``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec
from litestar import Request, delete, get, patch, post
from litestar.router import Router
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.admin.quota import QUOTA_ROUTES
from meter.admin.usage import parse_time, require_admin
from meter.billing.catalog import row_to_json
from meter.billing.ledger import billing_report, rerate
from meter.billing.rating import month_range
from meter.errors import NotFound, RequestError
from meter.tenancy.audit import admin_actor
from meter.tenancy.identity import bearer_token
from meter.tenancy.keys import KeyKind
from meter.tenancy.runtime import Tenancy


class TeamCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    description: str = ""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    upstream_credential: str | None = None  # the name of a credential configured on meter


class TeamUpdate(msgspec.Struct, forbid_unknown_fields=True):
    name: str | None = None
    description: str | None = None
    labels: dict[str, str] | None = None
    # absent: unchanged; null or "": the team's virtual keys use METER_UPSTREAM_API_KEY
    upstream_credential: str | msgspec.UnsetType | None = msgspec.UNSET


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    kind: Literal["virtual", "passthrough"] = "virtual"
    name: str = ""
    expires_at: datetime | None = None
    key: str | None = None  # passthrough: the provider key (fingerprinted, never stored)
    fingerprint: str | None = None  # passthrough: or its fingerprint
    suffix: str | None = None  # with fingerprint: the display suffix ("...abcd")


class KeyUpdate(msgspec.Struct, forbid_unknown_fields=True):
    team: str


class PriceCreate(msgspec.Struct, forbid_unknown_fields=True):
    model: str  # a model name or "tier:<name>"
    input: str  # USD per 1M tokens, as a decimal string
    output: str
    effective_from: datetime
    cached_input: str | None = None
    source: str = ""


class RerateRequest(msgspec.Struct, forbid_unknown_fields=True):
    since: datetime
    until: datetime
    dry_run: bool = False


def _tenancy(request: Request[Any, Any, Any]) -> Tenancy:
    tenancy: Tenancy = request.app.state.tenancy
    return tenancy


def _actor(request: Request[Any, Any, Any]) -> str:
    token = bearer_token(request.headers.get("authorization")) or ""
    return admin_actor(token, _tenancy(request).fingerprinter)


def _aware(moment: datetime | None, name: str) -> datetime | None:
    return None if moment is None else parse_time(moment.isoformat(), name)


# -- teams ----------------------------------------------------------------------------------------


@post("/teams", status_code=201)
async def create_team(request: Request[Any, Any, Any], data: TeamCreate) -> dict[str, Any]:
    """Create a team."""
    team = await _tenancy(request).store.create_team(
        _actor(request),
        data.name,
        description=data.description,
        labels=data.labels,
        upstream_credential=data.upstream_credential,
    )
    return team.to_json()


@get("/teams")
async def list_teams(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Every team, by name."""
    teams = await _tenancy(request).store.list_teams()
    return {"object": "list", "data": [team.to_json() for team in teams]}


@get("/teams/{name:str}")
async def show_team(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    """One team, with its key counts by status."""
    tenancy = _tenancy(request)
    team = await tenancy.store.get_team(name)
    keys = await tenancy.store.list_keys(name)
    now = tenancy.store.clock()
    counts: dict[str, int] = {"active": 0, "revoked": 0, "expired": 0}
    for key in keys:
        counts[key.status(now)] += 1
    return {**team.to_json(), "keys": counts}


@patch("/teams/{name:str}")
async def update_team(request: Request[Any, Any, Any], name: str, data: TeamUpdate) -> dict[str, Any]:
    """Rename a team or change its description, labels or upstream credential."""
    kwargs: dict[str, Any] = {}
    if data.upstream_credential is not msgspec.UNSET:
        kwargs["upstream_credential"] = data.upstream_credential
    team = await _tenancy(request).store.update_team(
        _actor(request),
        name,
        new_name=data.name,
        description=data.description,
        labels=data.labels,
        **kwargs,
    )
    return team.to_json()


@delete("/teams/{name:str}", status_code=200)
async def delete_team(request: Request[Any, Any, Any], name: str, force: bool = False) -> dict[str, Any]:
    """Delete a team (and its key registrations). Past usage keeps the team's name."""
    removed = await _tenancy(request).store.delete_team(_actor(request), name, force=force)
    return {"object": "team", "name": name, "deleted": True, "keys_removed": removed}


# -- keys -----------------------------------------------------------------------------------------


@post("/teams/{name:str}/keys", status_code=201)
async def create_key(request: Request[Any, Any, Any], name: str, data: KeyCreate) -> dict[str, Any]:
    """Issue a virtual key (``key`` in the answer is shown this once) or register a passthrough key."""
    tenancy = _tenancy(request)
    store = tenancy.store
    expires_at = _aware(data.expires_at, "expires_at")
    if data.kind == KeyKind.VIRTUAL.value:
        if data.key is not None or data.fingerprint is not None:
            raise RequestError("virtual keys are generated by meter; omit key and fingerprint", param="key")
        issued = await store.issue_virtual_key(_actor(request), name, name=data.name, expires_at=expires_at)
        answer = {**issued.info.to_json(store.clock()), "key": issued.key}
        if tenancy.credentials.default is None and not (await store.get_team(name)).upstream_credential:
            answer["warning"] = (
                "no upstream credential: set METER_UPSTREAM_API_KEY or give the team an upstream_credential, "
                "or requests with this key are refused"
            )
        return answer
    info = await store.register_passthrough_key(
        _actor(request),
        name,
        key=data.key,
        fingerprint=data.fingerprint,
        suffix=data.suffix,
        name=data.name,
        expires_at=expires_at,
    )
    return info.to_json(store.clock())


@get("/teams/{name:str}/keys")
async def list_team_keys(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    """The team's keys (suffix, status, created, last used); never a key itself."""
    store = _tenancy(request).store
    now = store.clock()
    return {"object": "list", "data": [key.to_json(now) for key in await store.list_keys(name)]}


@get("/keys")
async def list_keys(request: Request[Any, Any, Any], team: str | None = None) -> dict[str, Any]:
    """Every key, or one team's."""
    store = _tenancy(request).store
    now = store.clock()
    return {"object": "list", "data": [key.to_json(now) for key in await store.list_keys(team)]}


@get("/keys/{key_id:int}")
async def show_key(request: Request[Any, Any, Any], key_id: int) -> dict[str, Any]:
    store = _tenancy(request).store
    return (await store.get_key(key_id)).to_json(store.clock())


@patch("/keys/{key_id:int}")
async def move_key(request: Request[Any, Any, Any], key_id: int, data: KeyUpdate) -> dict[str, Any]:
    """Move a key to another team: its usage from now on belongs to that team; past records keep theirs."""
    store = _tenancy(request).store
    return (await store.move_key(_actor(request), key_id, data.team)).to_json(store.clock())


@post("/keys/{key_id:int}/revoke", status_code=200)
async def revoke_key(request: Request[Any, Any, Any], key_id: int) -> dict[str, Any]:
    """Revoke a key: requests with it get 401 on every replica within seconds."""
    store = _tenancy(request).store
    return (await store.revoke_key(_actor(request), key_id)).to_json(store.clock())


# -- prices ---------------------------------------------------------------------------------------


@get("/prices")
async def list_prices(request: Request[Any, Any, Any], model: str | None = None) -> dict[str, Any]:
    """Every price row of the catalog (shipped sheet, price file, database), or one model's."""
    catalog = _tenancy(request).prices.catalog
    rows = [
        row_to_json(row, catalog.ref(row))
        for origin in ("sheet", "file", "db")
        for row in catalog.sources[origin]
        if model is None or row.model == model
    ]
    return {"object": "list", "data": rows}


@post("/prices", status_code=201)
async def add_price(request: Request[Any, Any, Any], data: PriceCreate) -> dict[str, Any]:
    """Add a price row, in force from ``effective_from``. A correction is a new row with the same
    model and effective_from; then re-rate the affected range (``POST /billing/rerate``)."""
    tenancy = _tenancy(request)
    effective_from = _aware(data.effective_from, "effective_from")
    assert effective_from is not None
    row = await tenancy.store.add_price(
        _actor(request),
        model=data.model,
        input=data.input,
        output=data.output,
        cached_input=data.cached_input,
        effective_from=effective_from,
        source=data.source,
    )
    return row_to_json(row, tenancy.prices.catalog.ref(row))


@get("/prices/lookup")
async def lookup_price(request: Request[Any, Any, Any], model: str, at: str | None = None) -> dict[str, Any]:
    """The row that prices ``model`` at ``at`` (default: now), size-tier fallback included."""
    tenancy = _tenancy(request)
    moment = parse_time(at, "at") or tenancy.store.clock()
    catalog = tenancy.prices.catalog
    row = catalog.lookup(model, moment)
    if row is None:
        raise NotFound(
            f"no price applies to {model!r} at {moment.isoformat()}: its usage is unpriced", param="model"
        )
    return row_to_json(row, catalog.ref(row))


# -- billing --------------------------------------------------------------------------------------


def billing_range(
    month: str | None, since: str | None, until: str | None
) -> tuple[datetime | None, datetime | None]:
    if month is not None:
        if since is not None or until is not None:
            raise RequestError("give month, or since/until, not both", param="month")
        try:
            return month_range(month)
        except ValueError as exc:
            raise RequestError(str(exc), param="month") from None
    return parse_time(since, "since"), parse_time(until, "until")


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
    engine: AsyncEngine = request.app.state.engine
    report = await billing_report(engine, since=start, until=end, period=chosen, team=team, model=model)
    return report.to_json()


@post("/billing/rerate", status_code=200)
async def rerate_range(request: Request[Any, Any, Any], data: RerateRequest) -> dict[str, Any]:
    """Recompute the cost of every stored request in ``[since, until)`` with the current prices;
    idempotent, and the answer says what changed."""
    since, until = _aware(data.since, "since"), _aware(data.until, "until")
    if since is None or until is None or since >= until:
        raise RequestError("since must be before until", param="since")
    tenancy = _tenancy(request)
    await tenancy.reload()  # the newest price rows, also when another replica added them a moment ago
    result = await rerate(
        request.app.state.engine,
        tenancy.prices.catalog,
        since=since,
        until=until,
        dry_run=data.dry_run,
        actor=_actor(request),
    )
    return result.to_json()


# -- audit ----------------------------------------------------------------------------------------


@get("/audit")
async def audit(
    request: Request[Any, Any, Any], limit: int = 100, since: str | None = None, target: str | None = None
) -> dict[str, Any]:
    """Admin writes, newest first: who (token digest or CLI user), what, when."""
    if not 1 <= limit <= 10_000:
        raise RequestError("limit must be between 1 and 10000", param="limit")
    entries = await _tenancy(request).store.audit(
        limit=limit, since=parse_time(since, "since"), target=target
    )
    return {"object": "list", "data": [entry.to_json() for entry in entries]}


ROUTES = [
    create_team,
    list_teams,
    show_team,
    update_team,
    delete_team,
    create_key,
    list_team_keys,
    list_keys,
    show_key,
    move_key,
    revoke_key,
    list_prices,
    add_price,
    lookup_price,
    billing,
    rerate_range,
    audit,
    *QUOTA_ROUTES,
]


def manage_router() -> Router:
    """Mount next to :func:`meter.admin.usage.admin_router` on the same Litestar app."""
    return Router(path="/admin/v1", route_handlers=ROUTES, guards=[require_admin], tags=["admin: manage"])
