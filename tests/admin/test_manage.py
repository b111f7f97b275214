"""The admin API for teams and keys on SQLite and PostgreSQL: lifecycle, validation, the one-time key
display, audit, OpenAPI schema, and the token guard (401s, constant-time comparison)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.admin.auth import require_admin
from meter.db.tenancy_models import api_keys, audit_log
from meter.errors import AuthenticationError
from meter.tenancy.audit import admin_actor
from meter.tenancy.runtime import Tenancy, TenancyConfig
from tests.support.admin import AUTH, FP, TOKEN, admin_app, asgi_client


@pytest.fixture
async def tenancy(db_engine: AsyncEngine) -> AsyncIterator[Tenancy]:
    tenancy = Tenancy(FP, TenancyConfig(upstream_api_key="fw_global"), sheet_rows=[])
    await tenancy.start(db_engine)
    yield tenancy
    await tenancy.stop()


@pytest.fixture
async def client(db_engine: AsyncEngine, tenancy: Tenancy) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(admin_app(db_engine, tenancy)) as client:
        yield client


async def test_team_and_key_lifecycle_through_the_api(
    client: httpx.AsyncClient, tenancy: Tenancy, db_engine: AsyncEngine
) -> None:
    created = await client.post(
        "/admin/v1/teams",
        json={"name": "search", "description": "ranking", "labels": {"cost-center": "42"}},
        headers=AUTH,
    )
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "search" and created.json()["labels"] == {"cost-center": "42"}
    assert (await client.post("/admin/v1/teams", json={"name": "search"}, headers=AUTH)).status_code == 409
    bad = await client.post("/admin/v1/teams", json={"name": "no spaces please"}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"
    unknown_field = await client.post("/admin/v1/teams", json={"name": "x", "colour": "red"}, headers=AUTH)
    assert unknown_field.status_code == 400 and "error" in unknown_field.json()
    assert (await client.post("/admin/v1/teams", json={"name": "ads"}, headers=AUTH)).status_code == 201

    listed = (await client.get("/admin/v1/teams", headers=AUTH)).json()["data"]
    assert [t["name"] for t in listed] == ["ads", "search"]
    patched = await client.patch(
        "/admin/v1/teams/search", json={"description": "search & ranking"}, headers=AUTH
    )
    assert patched.json()["description"] == "search & ranking" and patched.json()["labels"] == {
        "cost-center": "42"
    }
    assert (await client.get("/admin/v1/teams/nobody", headers=AUTH)).status_code == 404

    # Virtual key: shown once, resolvable at once, stored as a fingerprint.
    issued = await client.post("/admin/v1/teams/search/keys", json={"name": "ci"}, headers=AUTH)
    assert issued.status_code == 201, issued.text
    body = issued.json()
    virtual = body["key"]
    assert virtual.startswith("mk-") and body["suffix"] == "..." + virtual[-4:] and body["status"] == "active"
    assert tenancy.resolve(virtual).upstream_authorization == "Bearer fw_global"
    listed_keys = (await client.get("/admin/v1/teams/search/keys", headers=AUTH)).json()["data"]
    assert len(listed_keys) == 1 and "key" not in listed_keys[0]
    assert set(listed_keys[0]) >= {"suffix", "created_at", "last_used_at", "expires_at", "status"}

    # Passthrough key, by value and by fingerprint.
    provider = "fw_provider_key_ads_0042"
    registered = await client.post(
        "/admin/v1/teams/ads/keys", json={"kind": "passthrough", "key": provider}, headers=AUTH
    )
    assert registered.status_code == 201 and registered.json()["suffix"] == "...0042"
    assert "key" not in registered.json()
    assert tenancy.resolve(provider).team == "ads"
    dup = await client.post(
        "/admin/v1/teams/search/keys", json={"kind": "passthrough", "key": provider}, headers=AUTH
    )
    assert dup.status_code == 409
    by_fp = await client.post(
        "/admin/v1/teams/ads/keys",
        json={"kind": "passthrough", "fingerprint": "cd" * 32, "suffix": "...cdcd"},
        headers=AUTH,
    )
    assert by_fp.status_code == 201

    # Move, revoke.
    key_id = registered.json()["id"]
    moved = await client.patch(f"/admin/v1/keys/{key_id}", json={"team": "search"}, headers=AUTH)
    assert moved.json()["team"] == "search" and tenancy.resolve(provider).team == "search"
    revoked = await client.post(f"/admin/v1/keys/{body['id']}/revoke", headers=AUTH)
    assert revoked.json()["status"] == "revoked"
    assert (await client.get(f"/admin/v1/keys/{body['id']}", headers=AUTH)).json()["status"] == "revoked"
    shown = (await client.get("/admin/v1/teams/search", headers=AUTH)).json()
    assert shown["keys"] == {"active": 1, "revoked": 1, "expired": 0}

    # Delete: refused with active keys, unless forced.
    assert (await client.delete("/admin/v1/teams/ads", headers=AUTH)).status_code == 409
    deleted = await client.delete("/admin/v1/teams/ads", params={"force": "true"}, headers=AUTH)
    assert deleted.status_code == 200 and deleted.json()["keys_removed"] == 1

    audit = (await client.get("/admin/v1/audit", headers=AUTH)).json()["data"]
    actor = admin_actor(TOKEN, FP)
    assert {e["actor"] for e in audit} == {actor}
    assert [e["action"] for e in reversed(audit)] == [
        "team.create",
        "team.create",
        "team.update",
        "key.issue",
        "key.register",
        "key.register",
        "key.move",
        "key.revoke",
        "team.delete",
    ]
    async with db_engine.connect() as conn:
        stored = repr((await conn.execute(select(api_keys))).all()) + repr(
            (await conn.execute(select(audit_log))).all()
        )
    assert virtual not in stored and provider not in stored and TOKEN not in stored


async def test_schema_lists_the_endpoints(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/admin/schema/openapi.json", headers=AUTH)).json()
    for path in (
        "/admin/v1/teams",
        "/admin/v1/teams/{name}/keys",
        "/admin/v1/keys/{key_id}/revoke",
        "/admin/v1/billing",
    ):
        assert path in schema["paths"], path


async def test_every_endpoint_rejects_a_missing_or_wrong_token(client: httpx.AsyncClient) -> None:
    calls = [
        ("GET", "/admin/v1/teams"),
        ("POST", "/admin/v1/teams"),
        ("GET", "/admin/v1/teams/x"),
        ("PATCH", "/admin/v1/teams/x"),
        ("DELETE", "/admin/v1/teams/x"),
        ("POST", "/admin/v1/teams/x/keys"),
        ("GET", "/admin/v1/keys"),
        ("POST", "/admin/v1/keys/1/revoke"),
        ("GET", "/admin/v1/prices"),
        ("POST", "/admin/v1/prices"),
        ("GET", "/admin/v1/billing"),
        ("POST", "/admin/v1/billing/rerate"),
        ("GET", "/admin/v1/audit"),
    ]
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        for method, path in calls:
            response = await client.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["type"] == "authentication_error"


async def test_without_an_admin_token_the_api_is_off(db_engine: AsyncEngine, tenancy: Tenancy) -> None:
    async with asgi_client(admin_app(db_engine, tenancy, token=None)) as client:
        response = await client.get("/admin/v1/teams", headers=AUTH)
        assert response.status_code == 403 and "METER_ADMIN_TOKEN" in response.json()["error"]["message"]


class _Connection:
    """Just what require_admin reads."""

    def __init__(self, token: str) -> None:
        self.headers = {"authorization": f"Bearer {token}"}
        self.app = type("App", (), {"state": type("State", (), {"admin_token": TOKEN})()})()


def test_admin_tokens_are_compared_as_fixed_length_digests(monkeypatch):
    import meter.admin.auth

    seen: list[tuple[int, int]] = []
    real = meter.admin.auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(meter.admin.auth.hmac, "compare_digest", spy)
    for token in ("x", TOKEN[:-1], "y" * 500, TOKEN):
        coroutine = require_admin(_Connection(token), None)  # type: ignore[arg-type]
        with contextlib.suppress(AuthenticationError, StopIteration):
            coroutine.send(None)
    assert seen == [(32, 32)] * 4


def test_admin_token_comparison_time_does_not_depend_on_length():
    """A token of a different length is not refused faster than a wrong one of the right length: the
    guard compares fixed-length digests. Rounds alternate so machine noise hits every variant alike."""
    variants = {
        "same length": "x" * len(TOKEN),
        "one char": "x",
        "shorter": TOKEN[:-1],
        "right prefix": TOKEN[:16] + "y" * (len(TOKEN) - 16),
    }

    def refuse(connection: Any) -> None:
        coroutine = require_admin(connection, None)  # type: ignore[arg-type]
        try:
            coroutine.send(None)
        except AuthenticationError:
            return
        raise AssertionError("accepted a wrong token")

    connections = {name: _Connection(token) for name, token in variants.items()}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(400):
        for name, connection in connections.items():
            start = time.perf_counter_ns()
            for _ in range(25):
                refuse(connection)
            samples[name].append(time.perf_counter_ns() - start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    reference = medians["same length"]
    for name, median in medians.items():
        assert median > 0.75 * reference, f"{name}: {median:.0f} ns vs {reference:.0f} ns for the same length"
