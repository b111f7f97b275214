"""The admin API for quota limits and live quota status, on SQLite and PostgreSQL, through meter's
admin routes on a real litestar app: set/show/clear limits of teams and keys (validation naming the
field, 404s, audit), and ``/quota/status`` rendered from a real admission over the in-memory store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.errors import StoreUnavailable
from meter.quota.admission import Admission
from meter.quota.memory import MemoryStore
from meter.quota.policy import Limits, Policy
from meter.quota.store import SubjectState
from meter.records import Usage
from meter.tenancy.audit import admin_actor
from meter.tenancy.runtime import Tenancy, TenancyConfig
from tests.support.admin import AUTH, FP, TOKEN, admin_app, asgi_client
from tests.support.quota import INFO, price

NOW = datetime(2026, 11, 18, 9, 30, tzinfo=UTC)
LIMITS = {
    "budget_usd": "25.00",
    "budget_period": "month",
    "rpm": 600,
    "tpm": 100000,
    "max_concurrent": 20,
    "tokens_budget": None,
    "soft_ratio": "0.8",
}


@pytest.fixture
async def tenancy(db_engine: AsyncEngine) -> AsyncIterator[Tenancy]:
    tenancy = Tenancy(FP, TenancyConfig(upstream_api_key="fw_global"), sheet_rows=[])
    await tenancy.start(db_engine)
    tenancy.store.clock = lambda: NOW
    yield tenancy
    await tenancy.stop()


@pytest.fixture
def admission(tenancy: Tenancy) -> Admission:
    return Admission(MemoryStore(), tenancy.limits, price, registry=CollectorRegistry())


@pytest.fixture
async def client(
    db_engine: AsyncEngine, tenancy: Tenancy, admission: Admission
) -> AsyncIterator[httpx.AsyncClient]:
    app = admin_app(db_engine, tenancy)
    app.state.quota = admission
    async with asgi_client(app) as client:
        yield client


async def setup(client: httpx.AsyncClient) -> dict[str, Any]:
    assert (await client.post("/admin/v1/teams", json={"name": "search"}, headers=AUTH)).status_code == 201
    issued = await client.post("/admin/v1/teams/search/keys", json={"name": "ci"}, headers=AUTH)
    assert issued.status_code == 201
    key: dict[str, Any] = issued.json()
    return key


async def test_set_show_and_clear_limits(client: httpx.AsyncClient, tenancy: Tenancy) -> None:
    key = await setup(client)
    shown = await client.get("/admin/v1/teams/search/limits", headers=AUTH)
    assert shown.status_code == 200 and shown.json() == {
        "object": "quota_limits",
        "team": "search",
        "limits": None,
    }

    put = await client.put("/admin/v1/teams/search/limits", json=LIMITS, headers=AUTH)
    assert put.status_code == 200, put.text
    expected = {**LIMITS, "prompt_tokens_budget": None, "completion_tokens_budget": None}
    assert put.json()["limits"] == expected
    assert (await client.get("/admin/v1/teams/search/limits", headers=AUTH)).json()["limits"] == expected
    assert (await client.get("/admin/v1/teams/search", headers=AUTH)).json()["limits"] == expected
    team_limits, _ = tenancy.limits("search", None)
    assert team_limits is not None and team_limits.budget_usd == Decimal("25.00")  # applied at once

    # A PUT replaces the whole set; money may be given as a JSON number too.
    key_put = await client.put(
        f"/admin/v1/keys/{key['id']}/limits", json={"rpm": 2, "budget_usd": 1.5}, headers=AUTH
    )
    assert key_put.status_code == 200, key_put.text
    body = key_put.json()
    assert (body["key_id"], body["suffix"], body["team"]) == (key["id"], key["suffix"], "search")
    assert body["limits"]["rpm"] == 2 and body["limits"]["budget_usd"] == "1.5"
    assert "fingerprint" not in body
    again = await client.put(f"/admin/v1/keys/{key['id']}/limits", json={"tpm": 50}, headers=AUTH)
    assert again.json()["limits"]["rpm"] is None and again.json()["limits"]["tpm"] == 50
    assert tenancy.limits("search", key["fingerprint"])[1] == Limits(tpm=50)
    shown_key = (await client.get(f"/admin/v1/keys/{key['id']}/limits", headers=AUTH)).json()
    assert shown_key["limits"]["tpm"] == 50
    assert (await client.get(f"/admin/v1/keys/{key['id']}", headers=AUTH)).json()["limits"]["tpm"] == 50

    cleared = await client.delete("/admin/v1/teams/search/limits", headers=AUTH)
    assert cleared.status_code == 200 and cleared.json()["limits"] is None
    assert tenancy.limits("search", key["fingerprint"]) == (None, Limits(tpm=50))
    cleared_key = await client.delete(f"/admin/v1/keys/{key['id']}/limits", headers=AUTH)
    assert cleared_key.status_code == 200 and cleared_key.json()["limits"] is None

    audit = (await client.get("/admin/v1/audit", headers=AUTH)).json()["data"]
    limit_entries = [
        (e["action"], e["target"], e["detail"]) for e in reversed(audit) if "limits" in e["action"]
    ]
    assert limit_entries == [
        ("team.limits", "team:search", expected),
        ("key.limits", f"key:{key['id']}", Limits(rpm=2, budget_usd=Decimal("1.5")).to_dict()),
        ("key.limits", f"key:{key['id']}", Limits(tpm=50).to_dict()),
        ("team.limits", "team:search", {}),
        ("key.limits", f"key:{key['id']}", {}),
    ]
    actor = admin_actor(TOKEN, FP)
    assert {e["actor"] for e in audit} == {actor}


async def test_invalid_limits_and_missing_subjects(client: httpx.AsyncClient) -> None:
    key = await setup(client)
    cases = [
        ({"rpm": -1}, "rpm", "rpm must be a non-negative integer"),
        ({"rpm": 1.5}, "rpm", "rpm must be a non-negative integer"),
        ({"max_concurrent": True}, "max_concurrent", "max_concurrent must be a non-negative integer"),
        ({"budget_usd": "lots"}, "budget_usd", "budget_usd must be a decimal number"),
        ({"budget_period": "year"}, "budget_period", "budget_period must be one of day, week, month"),
        ({"soft_ratio": "0"}, "soft_ratio", "soft_ratio must be a Decimal in (0, 1]"),
        ({"rpm": 5, "rps": 1}, "rps", "unknown quota limit(s): rps"),
    ]
    for path in ("/admin/v1/teams/search/limits", f"/admin/v1/keys/{key['id']}/limits"):
        for payload, param, message in cases:
            response = await client.put(path, json=payload, headers=AUTH)
            assert response.status_code == 400, (path, payload, response.text)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param, (payload, error)
            assert message in error["message"], (payload, error)
        not_an_object = await client.put(path, json=[1, 2], headers=AUTH)
        assert not_an_object.status_code == 400 and "error" in not_an_object.json()
    assert (await client.get("/admin/v1/teams/search/limits", headers=AUTH)).json()["limits"] is None

    for method in ("GET", "PUT", "DELETE"):
        missing_team = await client.request(method, "/admin/v1/teams/nobody/limits", json={}, headers=AUTH)
        assert missing_team.status_code == 404 and missing_team.json()["error"]["code"] == "not_found"
        missing_key = await client.request(method, "/admin/v1/keys/999/limits", json={}, headers=AUTH)
        assert (
            missing_key.status_code == 404 and "no key with id 999" in missing_key.json()["error"]["message"]
        )


async def test_live_status_of_a_team_and_a_key(
    client: httpx.AsyncClient, tenancy: Tenancy, admission: Admission
) -> None:
    key = await setup(client)
    await client.put("/admin/v1/teams/search/limits", json=LIMITS, headers=AUTH)
    await client.put(f"/admin/v1/keys/{key['id']}/limits", json={"rpm": 2}, headers=AUTH)
    # Two requests admitted (100 prompt + 200 output tokens reserved, $0.0005 each); one has finished.
    first = await admission.admit("search", key["fingerprint"], INFO, NOW)
    second = await admission.admit("search", key["fingerprint"], INFO, NOW)
    assert first.allowed and second.allowed and first.reservation is not None
    await admission.settle(first.reservation, Usage(prompt_tokens=100, completion_tokens=50), None, NOW)

    response = await client.get(
        "/admin/v1/quota/status", params={"team": "search", "key_id": key["id"]}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    status = response.json()
    assert key["fingerprint"] not in response.text
    assert (status["object"], status["source"], status["store"]) == ("quota_status", "live", "memory")
    assert status["at"] == NOW.isoformat()
    team, key_state = status["data"]
    assert team["subject"] == {"kind": "team", "team": "search"}
    assert key_state["subject"] == {
        "kind": "key",
        "key_id": key["id"],
        "suffix": key["suffix"],
        "team": "search",
    }
    assert (team["budget_period"], team["period_start"], team["period_end"]) == (
        "month",
        "2026-11-01T00:00:00+00:00",
        "2026-12-01T00:00:00+00:00",
    )
    by_kind = {limit["kind"]: limit for limit in team["limits"]}
    assert list(by_kind) == ["budget_usd", "rpm", "tpm", "concurrency"]
    assert by_kind["budget_usd"] == {
        "kind": "budget_usd",
        "limit": "25.00",
        "used": "0.0002",  # settled: 100 x $1/M + 50 x $2/M
        "reserved": "0.0005",  # the request still in flight
        "remaining": "24.9993",
        "ratio": 0.000028,
        "resets_at": "2026-12-01T00:00:00+00:00",
    }
    assert by_kind["rpm"] == {
        "kind": "rpm",
        "limit": 600,
        "used": 2,
        "reserved": 0,
        "remaining": 598,
        "ratio": round(2 / 600, 6),
        "resets_at": "2026-11-18T09:31:00+00:00",  # when the window is empty again
    }
    assert (by_kind["tpm"]["used"], by_kind["tpm"]["remaining"]) == (150 + 300, 100000 - 450)
    assert by_kind["concurrency"] == {
        "kind": "concurrency",
        "limit": 20,
        "used": 1,
        "reserved": 0,
        "remaining": 19,
        "ratio": 0.05,
        "resets_at": None,
    }
    assert [(lim["kind"], lim["used"], lim["remaining"]) for lim in key_state["limits"]] == [("rpm", 2, 0)]

    # Every limited subject when none is named; a named subject without limits shows none.
    everything = (await client.get("/admin/v1/quota/status", headers=AUTH)).json()["data"]
    assert [entry["subject"]["kind"] for entry in everything] == ["team", "key"]
    await client.delete(f"/admin/v1/keys/{key['id']}/limits", headers=AUTH)
    only_key = (await client.get("/admin/v1/quota/status", params={"key_id": key["id"]}, headers=AUTH)).json()
    assert only_key["data"] == [
        {
            "subject": {"kind": "key", "key_id": key["id"], "suffix": key["suffix"], "team": "search"},
            "budget_period": None,
            "period_start": None,
            "period_end": None,
            "limits": [],
        }
    ]
    missing = await client.get("/admin/v1/quota/status", params={"team": "nobody"}, headers=AUTH)
    assert missing.status_code == 404
    missing_key = await client.get("/admin/v1/quota/status", params={"key_id": 999}, headers=AUTH)
    assert missing_key.status_code == 404


class DownStore(MemoryStore):
    async def status(self, policies: Sequence[Policy], now: datetime) -> tuple[SubjectState, ...]:
        raise StoreUnavailable(self.name, ConnectionError("connection refused"))


async def test_status_is_503_without_quotas_or_their_store(
    db_engine: AsyncEngine, tenancy: Tenancy, client: httpx.AsyncClient
) -> None:
    await setup(client)
    await client.put("/admin/v1/teams/search/limits", json=LIMITS, headers=AUTH)

    app = admin_app(db_engine, tenancy)
    app.state.quota = None  # quotas not running in this process
    async with asgi_client(app) as off:
        response = await off.get("/admin/v1/quota/status", params={"team": "search"}, headers=AUTH)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "quota_unavailable" and "meter quota status" in error["message"]

    app.state.quota = Admission(DownStore(), tenancy.limits, price, registry=CollectorRegistry())
    async with asgi_client(app) as down:
        response = await down.get("/admin/v1/quota/status", params={"team": "search"}, headers=AUTH)
    assert response.status_code == 503
    assert "quota store (memory) cannot be reached" in response.json()["error"]["message"]


async def test_schema_and_token_guard(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/admin/schema/openapi.json", headers=AUTH)).json()
    assert set(schema["paths"]["/admin/v1/teams/{name}/limits"]) == {"get", "put", "delete"}
    assert set(schema["paths"]["/admin/v1/keys/{key_id}/limits"]) == {"get", "put", "delete"}
    assert "get" in schema["paths"]["/admin/v1/quota/status"]
    for method, path in [
        ("GET", "/admin/v1/teams/x/limits"),
        ("PUT", "/admin/v1/teams/x/limits"),
        ("DELETE", "/admin/v1/teams/x/limits"),
        ("GET", "/admin/v1/keys/1/limits"),
        ("PUT", "/admin/v1/keys/1/limits"),
        ("DELETE", "/admin/v1/keys/1/limits"),
        ("GET", "/admin/v1/quota/status"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = await client.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path)
            assert response.json()["error"]["type"] == "authentication_error"
