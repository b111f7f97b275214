"""The admin API for quota limits and live quota status, under ``/admin/v1`` (mounted by
:func:`meter.admin.admin_routers` with the other resources: the same guard, error shape and audit actor).

Endpoints:

* ``GET/PUT/DELETE /teams/{team}/limits`` and ``GET/PUT/DELETE /keys/{key_id}/limits``: a subject's
  limits. PUT takes a JSON object of :class:`~meter.quota.policy.Limits` fields and replaces the whole
  set (fields left out have no limit); DELETE removes them. Every replica applies a change within its
  refresh interval, this one at once.
* ``GET /quota/status?team=&key_id=``: usage against every limit of the team and/or key (every limited
  subject when neither is given), live from this process's admission (``app.state.quota``; 503 when
  quotas are not running here or the quota store cannot be reached).
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, delete, get, put
from litestar.params import Body

from meter.admin.context import actor, tenancy
from meter.errors import QuotaUnavailable, StoreUnavailable
from meter.quota.admission import Admission
from meter.quota.report import render_status
from meter.quota.store import SubjectState
from meter.tenancy.key_store import KeyInfo
from meter.tenancy.limits import limits_json
from meter.tenancy.team_store import Team

LimitsBody = Annotated[
    Any,
    Body(
        title="Limits",
        description=(
            "A JSON object of quota limits, replacing the whole set: budget_usd (decimal string), "
            "budget_period (day, week or month; default month), tokens_budget, prompt_tokens_budget, "
            "completion_tokens_budget, rpm, tpm, max_concurrent (non-negative integers), soft_ratio "
            "(decimal string in (0, 1]; default 0.8). A field left out or null has no limit."
        ),
    ),
]


def _team_limits(team: Team) -> dict[str, Any]:
    return {"object": "quota_limits", "team": team.name, "limits": limits_json(team.limits)}


def _key_limits(key: KeyInfo) -> dict[str, Any]:
    return {
        "object": "quota_limits",
        "key_id": key.id,
        "suffix": key.suffix,
        "team": key.team,
        "limits": limits_json(key.limits),
    }


def _key_who(key: KeyInfo) -> dict[str, Any]:
    return {"kind": "key", "key_id": key.id, "suffix": key.suffix, "team": key.team}


# -- limits ---------------------------------------------------------------------------------------


@get("/teams/{name:str}/limits")
async def show_team_limits(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    """The team's quota limits (``limits`` null: none)."""
    return _team_limits(await tenancy(request).store.get_team(name))


@put("/teams/{name:str}/limits")
async def set_team_limits(request: Request[Any, Any, Any], name: str, data: LimitsBody) -> dict[str, Any]:
    """Replace the team's quota limits: budget_usd (decimal string), budget_period (day, week, month),
    tokens_budget, prompt_tokens_budget, completion_tokens_budget, rpm, tpm, max_concurrent (integers),
    soft_ratio (decimal string in (0, 1]). Fields left out or null have no limit."""
    team = await tenancy(request).store.set_team_limits(name, data, actor=actor(request))
    return _team_limits(team)


@delete("/teams/{name:str}/limits", status_code=200)
async def clear_team_limits(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    """Remove the team's quota limits."""
    team = await tenancy(request).store.set_team_limits(name, None, actor=actor(request))
    return _team_limits(team)


@get("/keys/{key_id:int}/limits")
async def show_key_limits(request: Request[Any, Any, Any], key_id: int) -> dict[str, Any]:
    """The key's own quota limits (its team's apply as well)."""
    return _key_limits(await tenancy(request).store.get_key(key_id))


@put("/keys/{key_id:int}/limits")
async def set_key_limits(request: Request[Any, Any, Any], key_id: int, data: LimitsBody) -> dict[str, Any]:
    """Replace the key's quota limits (same fields as a team's). A request must pass both its key's
    and its team's limits."""
    key = await tenancy(request).store.set_key_limits(key_id, data, actor=actor(request))
    return _key_limits(key)


@delete("/keys/{key_id:int}/limits", status_code=200)
async def clear_key_limits(request: Request[Any, Any, Any], key_id: int) -> dict[str, Any]:
    """Remove the key's quota limits."""
    key = await tenancy(request).store.set_key_limits(key_id, None, actor=actor(request))
    return _key_limits(key)


# -- status ---------------------------------------------------------------------------------------


@get("/quota/status")
async def quota_status(
    request: Request[Any, Any, Any], team: str | None = None, key_id: int | None = None
) -> dict[str, Any]:
    """Usage against every limit of ``team`` and/or key ``key_id`` (all limited subjects when neither
    is given), live from this process's quota store: per limit, the limit, used, reserved by requests
    in flight, remaining, ratio and when it resets. USD amounts are decimal strings."""
    admission: Admission | None = getattr(request.app.state, "quota", None)
    if admission is None:
        raise QuotaUnavailable(
            "quotas are not enforced by this meter process, so it has no live quota status; "
            "`meter quota status` reads it from Redis or the database"
        )
    found = tenancy(request)
    store = found.store
    now = store.clock()
    # (who, team name, key fingerprint) per status call; the fingerprint never leaves this function.
    asks: list[tuple[list[dict[str, Any]], str | None, str | None]] = []
    if team is not None or key_id is not None:
        who: list[dict[str, Any]] = []
        fingerprint = None
        if team is not None:
            await store.get_team(team)  # 404 for a team that does not exist
            who.append({"kind": "team", "team": team})
        if key_id is not None:
            key = await store.get_key(key_id)
            who.append(_key_who(key))
            fingerprint = key.fingerprint
        asks.append((who, team, fingerprint))
    else:
        keys = {key.fingerprint: key for key in await store.list_keys()}
        for subject, _ in found.limited_subjects():
            if subject.kind == "team":
                asks.append(([{"kind": "team", "team": subject.name}], subject.name, None))
            elif subject.name in keys:
                asks.append(([_key_who(keys[subject.name])], None, subject.name))
    subjects: list[tuple[dict[str, Any], SubjectState | None]] = []
    try:
        for who, team_name, fingerprint in asks:
            states = await admission.status(team_name, fingerprint, now)
            by_kind = {state.subject.kind: state for state in states}
            subjects += [(w, by_kind.get(w["kind"])) for w in who]
    except StoreUnavailable as exc:
        raise QuotaUnavailable(
            f"the quota store ({admission.store.name}) cannot be reached: {exc.cause!r}"
        ) from None
    answer = render_status(subjects, now, source="live")
    answer["store"] = admission.store.name
    return answer


ROUTES = [
    show_team_limits,
    set_team_limits,
    clear_team_limits,
    show_key_limits,
    set_key_limits,
    clear_key_limits,
    quota_status,
]
