"""The admin API for teams, under ``/admin/v1`` (``{name}`` is a team name):

* ``POST /teams``, ``GET /teams``
* ``GET/PATCH/DELETE /teams/{name}`` (``DELETE ?force=true`` also when the team has active keys)

A team's keys are in :mod:`meter.admin.keys`, its limits in :mod:`meter.admin.quota`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, delete, get, patch, post

from meter.admin.context import actor, tenancy


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


@post("/teams", status_code=201)
async def create_team(request: Request[Any, Any, Any], data: TeamCreate) -> dict[str, Any]:
    """Create a team."""
    team = await tenancy(request).store.create_team(
        actor(request),
        data.name,
        description=data.description,
        labels=data.labels,
        upstream_credential=data.upstream_credential,
    )
    return team.to_json()


@get("/teams")
async def list_teams(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Every team, by name."""
    teams = await tenancy(request).store.list_teams()
    return {"object": "list", "data": [team.to_json() for team in teams]}


@get("/teams/{name:str}")
async def show_team(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    """One team, with its key counts by status."""
    store = tenancy(request).store
    team = await store.get_team(name)
    keys = await store.list_keys(name)
    now = store.clock()
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
    team = await tenancy(request).store.update_team(
        actor(request),
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
    removed = await tenancy(request).store.delete_team(actor(request), name, force=force)
    return {"object": "team", "name": name, "deleted": True, "keys_removed": removed}


ROUTES = [create_team, list_teams, show_team, update_team, delete_team]
