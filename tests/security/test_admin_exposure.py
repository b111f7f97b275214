"""What the admin API gives away: its schema only to holders of the admin token, no third-party
scripts, and an audit actor nobody without meter's key secret can compute from a guessed token."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import httpx
import pytest

from meter.tenancy.audit import admin_actor
from meter.tenancy.identity import KeyFingerprinter
from tests.conftest import MeterHandle, SimHandle

TOKEN = "admin-token-for-exposure-tests-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCHEMA_PATHS = [
    "/admin/schema",
    "/admin/schema/openapi.json",
    "/admin/schema/openapi.yaml",
    "/admin/schema/openapi.yml",
]
# Where litestar's documentation pages used to live (Swagger UI was the one meter mounted).
PAGE_PATHS = [
    "/admin/schema/swagger",
    "/admin/schema/redoc",
    "/admin/schema/rapidoc",
    "/admin/schema/elements",
    "/admin/schema/scalar",
    "/admin/schema/oauth2-redirect.html",
]


@pytest.fixture
def admin_meter(start_meter: Callable[..., MeterHandle], simulator: SimHandle) -> MeterHandle:
    return start_meter(simulator.url, admin_token=TOKEN)


def test_schema_needs_the_admin_token(admin_meter: MeterHandle) -> None:
    for authorization in (None, "Bearer wrong", "Basic " + TOKEN):
        headers = {"Authorization": authorization} if authorization else {}
        other = httpx.get(admin_meter.url + "/admin/v1/usage", headers=headers)
        assert other.status_code == 401
        for path in SCHEMA_PATHS + PAGE_PATHS:
            response = httpx.get(admin_meter.url + path, headers=headers)
            assert response.status_code == 401, (path, authorization)
            assert response.headers["content-type"] == "application/json"
            assert response.json() == other.json()  # the same error as every admin endpoint


def test_schema_is_off_with_the_admin_api(
    start_meter: Callable[..., MeterHandle], simulator: SimHandle
) -> None:
    meter = start_meter(simulator.url)
    response = httpx.get(meter.url + "/admin/schema/openapi.json", headers=AUTH)
    assert response.status_code == 403 and "METER_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_schema_is_served_to_the_token_without_third_party_assets(admin_meter: MeterHandle) -> None:
    root, as_json, as_yaml, as_yml = (httpx.get(admin_meter.url + p, headers=AUTH) for p in SCHEMA_PATHS)
    assert root.status_code == as_json.status_code == 200
    assert root.json() == as_json.json() and "/admin/v1/teams" in as_json.json()["paths"]
    assert "/admin/schema/openapi.json" not in as_json.json()["paths"]
    assert as_yaml.status_code == as_yml.status_code == 200 and "/admin/v1/teams:" in as_yaml.text
    for path in PAGE_PATHS:
        assert httpx.get(admin_meter.url + path, headers=AUTH).status_code == 404, path
    for path in SCHEMA_PATHS + PAGE_PATHS:
        body = httpx.get(admin_meter.url + path, headers=AUTH).text
        assert not re.search(r"<script|<link|https?://", body, re.IGNORECASE), path


def test_the_audit_actor_is_keyed(start_meter: Callable[..., MeterHandle], simulator: SimHandle) -> None:
    actors = []
    for secret in ("first-key-secret-0123456789", "second-key-secret-0123456789"):
        meter = start_meter(simulator.url, admin_token=TOKEN, key_secret=secret)
        created = httpx.post(f"{meter.url}/admin/v1/teams", json={"name": "search"}, headers=AUTH)
        assert created.status_code == 201, created.text
        (entry,) = httpx.get(f"{meter.url}/admin/v1/audit", headers=AUTH).json()["data"]
        actors.append(entry["actor"])
        assert entry["actor"] == admin_actor(TOKEN, KeyFingerprinter(secret.encode()))
    assert all(re.fullmatch(r"admin:[0-9a-f]{16}", actor) for actor in actors)
    # Not the unkeyed digest anyone could compute from a guess, and not the same under another secret.
    assert not any(hashlib.sha256(TOKEN.encode()).hexdigest()[:12] in actor for actor in actors)
    assert actors[0] != actors[1]
    fingerprinter = KeyFingerprinter(b"first-key-secret-0123456789")
    assert admin_actor("another-token", fingerprinter) != admin_actor(TOKEN, fingerprinter)
    # Not the fingerprint the proxy records for a client sending the token as its API key.
    assert fingerprinter.identify(TOKEN).fingerprint[:16] not in actors[0]
