"""Teams, keys and prices end to end: the real openai SDK through a running meter to the simulator.

* a virtual key is swapped for the upstream credential (the simulator, which records every header it
  receives, sees the credential and never the virtual key); revoked and unknown virtual keys get an
  OpenAI-shaped 401 and never reach the upstream;
* a passthrough key is forwarded as sent and attributed to its team; moving it to another team changes
  the attribution of later requests only;
* METER_UNKNOWN_KEYS=reject refuses unregistered keys;
* a price added while meter runs bills the requests after it at the new price, those before at theirs,
  and the billing report equals the sum of the stored per-request costs;
* no key (virtual, provider or upstream credential) appears in the database file, the journal, the
  log output, the spans or /metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from meter.app import Runtime, create_app
from meter.db import migrate
from meter.db.engine import create_engine
from meter.db.models import usage_events
from meter.settings import load_settings
from meter.simulator import count_prompt_tokens
from meter.sinks.tracing import GenAITracer
from tests.conftest import MeterHandle, wait_for
from tests.support.serve import serve_in_thread

pytestmark = pytest.mark.skipif(
    "tenancy" not in Runtime.__dataclass_fields__,
    reason="needs the teams/keys wiring in meter.app and meter.forward.handler",
)

ADMIN = "e2e-admin-token-0123456789abcdef"
UPSTREAM = "fw_upstream_credential_for_meter_7777"
MODEL = "llama-v3p1-8b-instruct"  # the simulator answers as accounts/fireworks/models/<this>: $0.20 / 1M
MESSAGES = [{"role": "user", "content": "say hello to the team"}]


SECRET = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def start_on(
    db_url: str, start_meter: Callable[..., MeterHandle], tmp_path: Path
) -> Callable[..., MeterHandle]:
    """start_meter on ``db_url`` (SQLite, or a fresh PostgreSQL database migrated as an operator would).
    ``db_url`` comes first so that it is torn down last: the meters stop before their database goes."""

    def start(upstream_url: str, **overrides: Any) -> MeterHandle:
        if not db_url.startswith("sqlite"):
            asyncio.run(migrate.upgrade(db_url))
        return start_meter(
            upstream_url,
            database_url=db_url,
            key_secret=SECRET,
            journal_dir=str(tmp_path / "journal"),
            **overrides,
        )

    return start


def stored(db_url: str, expected: int) -> list[dict[str, Any]]:
    """Wait until ``expected`` usage rows are in the database; all of them, oldest first."""

    async def read() -> list[dict[str, Any]]:
        engine = create_engine(db_url)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(select(usage_events).order_by(usage_events.c.event_id))
                return [dict(row._mapping) for row in result]
        finally:
            await engine.dispose()

    def enough() -> list[dict[str, Any]] | None:
        rows = asyncio.run(read())
        return rows if len(rows) >= expected else None

    rows: list[dict[str, Any]] = wait_for(enough, message=f"{expected} usage rows")
    assert len(rows) == expected
    return rows


def admin(meter: MeterHandle) -> httpx.Client:
    return httpx.Client(base_url=f"{meter.url}/admin/v1", headers={"Authorization": f"Bearer {ADMIN}"})


def sdk(meter: MeterHandle, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=meter.base_url, api_key=key, max_retries=0)


def expected_nanos(prompt: int, completion: int, price: str = "0.20") -> int:
    return int((prompt + completion) * Decimal(price) * 1000)  # USD per 1M tokens -> nano-USD per token


def test_virtual_key_reaches_meter_and_the_upstream_credential_reaches_the_upstream(
    start_on, db_url, simulator
):
    meter = start_on(simulator.url, admin_token=ADMIN, upstream_api_key=UPSTREAM, key_directory_refresh=0.05)
    with admin(meter) as api:
        assert api.post("/teams", json={"name": "search"}).status_code == 201
        issued = api.post("/teams/search/keys", json={"name": "e2e"}).json()
    virtual = issued["key"]
    client = sdk(meter, virtual)

    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=7, stream=True, stream_options={"include_usage": True}
        )
    )
    assert reply.usage is not None and chunks[-1].usage is not None

    received = list(simulator.sim.received)
    assert len(received) == 2
    for request in received:
        assert request.header("authorization") == f"Bearer {UPSTREAM}"
        assert all(virtual not in value and virtual[3:] not in value for _, value in request.headers)
        assert virtual.encode() not in request.body

    rows = stored(db_url, 2)
    prompt = count_prompt_tokens({"messages": MESSAGES})
    for row, completion in zip(rows, (5, 7), strict=True):
        assert row["team"] == "search"
        assert (row["key_fingerprint"], row["key_suffix"]) == (issued["fingerprint"], issued["suffix"])
        assert row["cost_nanos"] == expected_nanos(prompt, completion)
        assert row["price_ref"] == f"sheet:2025-08-01:accounts/fireworks/models/{MODEL}"

    # Revoked, unknown: an OpenAI-shaped 401 from meter, nothing sent upstream.
    with admin(meter) as api:
        assert api.post(f"/keys/{issued['id']}/revoke").json()["status"] == "revoked"
    for key in (virtual, "mk-" + "x" * 43):
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk(meter, key).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
        assert caught.value.status_code == 401
        error = caught.value.body
        assert isinstance(error, dict) and error["type"] == "authentication_error"
        assert error["code"] == "invalid_api_key" and key not in error["message"]
    assert len(simulator.sim.received) == 2
    refused = stored(db_url, 4)[2:]
    assert [(r["status_code"], r["team"], r["cost_nanos"]) for r in refused] == [
        (401, "search", None),
        (401, "unassigned", None),
    ]
    with admin(meter) as api:  # noted per request in memory, written by the refresh loop
        wait_for(lambda: api.get(f"/keys/{issued['id']}").json()["last_used_at"], message="last_used_at")


def test_team_credential_from_the_credentials_file(start_meter, simulator, tmp_path):
    credentials = tmp_path / "credentials.toml"
    credentials.write_text('search-account = "fw_search_team_account_4242"\n')
    meter = start_meter(simulator.url, admin_token=ADMIN, upstream_credentials_file=str(credentials))
    with admin(meter) as api:
        api.post("/teams", json={"name": "search", "upstream_credential": "search-account"})
        api.post("/teams", json={"name": "ads"})
        refused = api.post("/teams", json={"name": "x", "upstream_credential": "not-configured"})
        assert refused.status_code == 400
        search_key = api.post("/teams/search/keys", json={}).json()["key"]
        ads_issued = api.post("/teams/ads/keys", json={}).json()
    assert "warning" in ads_issued  # neither a team credential nor METER_UPSTREAM_API_KEY
    sdk(meter, search_key).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert simulator.sim.received[-1].header("authorization") == "Bearer fw_search_team_account_4242"
    with pytest.raises(openai.InternalServerError) as caught:
        sdk(meter, ads_issued["key"]).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert caught.value.status_code == 500 and caught.value.body["code"] == "upstream_credential_missing"
    assert len(simulator.sim.received) == 1
    assert [(r["status_code"], r["team"]) for r in meter.rows(2)] == [(200, "search"), (500, "ads")]


def test_passthrough_key_is_forwarded_and_attributed_and_moving_it_keeps_history(start_on, db_url, simulator):
    meter = start_on(simulator.url, admin_token=ADMIN)
    provider = "fw_team_provider_key_0099"
    with admin(meter) as api:
        api.post("/teams", json={"name": "search"})
        api.post("/teams", json={"name": "ads"})
        key_id = api.post("/teams/search/keys", json={"kind": "passthrough", "key": provider}).json()["id"]
    sdk(meter, provider).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    with admin(meter) as api:
        assert api.patch(f"/keys/{key_id}", json={"team": "ads"}).json()["team"] == "ads"
    sdk(meter, provider).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    sdk(meter, "fw_nobody_registered_this").chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3
    )
    assert [r.header("authorization") for r in simulator.sim.received] == [
        f"Bearer {provider}",
        f"Bearer {provider}",
        "Bearer fw_nobody_registered_this",
    ]
    assert [r["team"] for r in stored(db_url, 3)] == ["search", "ads", "unassigned"]  # history kept

    with admin(meter) as api:
        month = datetime.now(UTC).strftime("%Y-%m")
        report = api.get("/billing", params={"month": month}).json()
    assert [(d["team"], d["requests"]) for d in report["data"]] == [
        ("ads", 1),
        ("search", 1),
        ("unassigned", 1),
    ]


def test_unknown_keys_can_be_rejected(start_meter, simulator):
    meter = start_meter(simulator.url, unknown_keys="reject")
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(meter, "fw_nobody_registered_this").chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=3
        )
    assert "not registered" in caught.value.body["message"]
    no_key = httpx.post(f"{meter.base_url}/chat/completions", json={"model": MODEL, "messages": MESSAGES})
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    assert len(simulator.sim.received) == 0


def test_a_price_change_bills_each_request_at_its_own_price(start_on, db_url, simulator):
    meter = start_on(simulator.url, admin_token=ADMIN)
    client = sdk(meter, "fw_pricing_test_key_0001")
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    with admin(meter) as api:
        added = api.post(
            "/prices",
            json={
                "model": MODEL,
                "input": "0.50",
                "output": "1.50",
                "effective_from": datetime.now(UTC).isoformat(),
            },
        )
        assert added.status_code == 201
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    before, after = stored(db_url, 2)
    prompt = count_prompt_tokens({"messages": MESSAGES})
    assert before["cost_nanos"] == expected_nanos(prompt, 4)
    assert after["cost_nanos"] == int((prompt * Decimal("0.50") + 4 * Decimal("1.50")) * 1000)
    assert after["price_ref"] == f"db:{added.json()['id']}"
    with admin(meter) as api:
        report = api.get("/billing", params={"month": datetime.now(UTC).strftime("%Y-%m")}).json()
    assert Decimal(report["total_usd"]) * 10**9 == before["cost_nanos"] + after["cost_nanos"]
    assert report["unpriced_requests"] == 0

    client.chat.completions.create(model="mystery-model", messages=MESSAGES, max_tokens=4)
    unpriced = stored(db_url, 3)[2]
    assert (unpriced["cost_nanos"], unpriced["price_ref"]) == (None, None)
    metrics = httpx.get(f"{meter.url}/metrics").text
    assert 'meter_unpriced_requests_total{model="mystery-model",team="unassigned"} 1.0' in metrics


def test_no_key_is_stored_logged_traced_or_exported(tmp_path: Path, simulator, caplog):
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    db = tmp_path / "meter.db"
    settings = load_settings(
        {"METER_DATABASE_URL": f"sqlite:///{db}", "METER_UPSTREAM_URL": simulator.url},
        admin_token=ADMIN,
        upstream_api_key=UPSTREAM,
        log_level="debug",
    )
    app = create_app(
        settings,
        registry=CollectorRegistry(),
        tracer=GenAITracer(provider, upstream_url=simulator.url),
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    caplog.set_level(logging.DEBUG)
    provider_key = "fw_secret_provider_key_KNOWN_1234"
    with serve_in_thread(app, lifespan="on") as server:
        meter = MeterHandle(server, app, db, [])
        with admin(meter) as api:
            api.post("/teams", json={"name": "search"})
            virtual = api.post("/teams/search/keys", json={}).json()["key"]
            api.post("/teams/search/keys", json={"kind": "passthrough", "key": provider_key})
        for key in (virtual, provider_key, "mk-unknown-but-secret-KNOWN-5678"):
            try:
                sdk(meter, key).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
                list(
                    sdk(meter, key).chat.completions.create(
                        model=MODEL, messages=MESSAGES, max_tokens=3, stream=True
                    )
                )
            except openai.AuthenticationError:
                pass
        meter.rows(5)
        exported = httpx.get(f"{meter.url}/metrics").text
        exported += httpx.get(f"{meter.url}/readyz").text
    secrets = [virtual, virtual[3:], provider_key, "mk-unknown-but-secret-KNOWN-5678", UPSTREAM]
    stored = b"".join(path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())
    logged = caplog.text
    assert sum(r.name == "meter.requests" for r in caplog.records) >= 5  # the request log was captured too
    traced = repr(
        [
            (s.name, dict(s.attributes or {}), [e.attributes for e in s.events])
            for s in spans.get_finished_spans()
        ]
    )
    traced += repr(reader.get_metrics_data())
    assert spans.get_finished_spans()
    for secret in secrets:
        assert secret.encode() not in stored, f"{secret[:6]}... stored"
        assert secret not in logged, f"{secret[:6]}... logged"
        assert secret not in traced, f"{secret[:6]}... traced"
        assert secret not in exported, f"{secret[:6]}... exported"
