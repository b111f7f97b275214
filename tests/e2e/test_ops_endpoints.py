"""meter's own endpoints: health, readiness, metrics, and the usage admin API; and the `meter usage` CLI."""

from __future__ import annotations

import json

import httpx
import openai
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from meter.cli.main import main

MESSAGES = [{"role": "user", "content": "one two three"}]


def _traffic(base_url: str) -> None:
    for key, model, n in (
        ("fw-team-a-0123456789abcdef-1111", "m-a", 2),
        ("fw-team-b-0123456789abcdef-2222", "m-b", 3),
    ):
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
        for _ in range(n):
            client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)


def test_health_and_readiness(meter):
    assert httpx.get(f"{meter.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{meter.url}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["database"] == "ok"


def test_metrics_text_and_openmetrics(meter):
    _traffic(meter.base_url)
    meter.rows(5)
    text = httpx.get(f"{meter.url}/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text.text)}
    requests = {
        tuple(sorted(s.labels.items())): s.value
        for s in families["meter_requests"].samples
        if s.name == "meter_requests_total"
    }
    key = (
        ("endpoint", "/v1/chat/completions"),
        ("model", "m-b"),
        ("status_code", "200"),
        ("team", "unassigned"),
    )
    assert requests[key] == 3
    assert "fw-team-a-0123456789abcdef-1111" not in text.text
    om = httpx.get(f"{meter.url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")


def test_admin_api_disabled_without_token(meter):
    response = httpx.get(f"{meter.url}/admin/v1/usage")
    assert response.status_code == 403
    assert "METER_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_admin_usage_and_requests(start_meter, simulator):
    meter = start_meter(simulator.url, admin_token="s3cret-admin-token")
    _traffic(meter.base_url)
    meter.rows(5)
    assert httpx.get(f"{meter.url}/admin/v1/usage").status_code == 401
    assert (
        httpx.get(f"{meter.url}/admin/v1/usage", headers={"Authorization": "Bearer wrong"}).status_code == 401
    )
    auth = {"Authorization": "Bearer s3cret-admin-token"}
    usage = httpx.get(f"{meter.url}/admin/v1/usage", params={"group_by": "model"}, headers=auth).json()[
        "data"
    ]
    by_model = {row["requested_model"]: row for row in usage}
    assert by_model["m-a"]["requests"] == 2 and by_model["m-b"]["requests"] == 3
    assert by_model["m-b"]["completion_tokens"] == 12
    bad = httpx.get(f"{meter.url}/admin/v1/usage", params={"group_by": "colour"}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"
    recent = httpx.get(f"{meter.url}/admin/v1/requests", params={"model": "m-a"}, headers=auth).json()["data"]
    assert len(recent) == 2 and all(r["requested_model"] == "m-a" for r in recent)
    assert all("fw-team" not in json.dumps(r) for r in recent)
    assert httpx.get(f"{meter.url}/admin/schema/openapi.json").status_code == 401
    schema = httpx.get(f"{meter.url}/admin/schema/openapi.json", headers=auth)
    assert schema.status_code == 200 and "/admin/v1/usage" in schema.json()["paths"]


def test_usage_cli_formats(meter):
    _traffic(meter.base_url)
    meter.rows(5)
    runner = CliRunner()
    db = f"sqlite:///{meter.db_path}"
    as_json = runner.invoke(
        main,
        ["usage", "--database", db, "--group-by", "key", "--format", "json"],
        env={"METER_DATABASE_URL": None},
    )
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.output)
    assert sorted(r["requests"] for r in rows) == [2, 3]
    assert sorted(r["key_suffix"] for r in rows) == ["...1111", "...2222"]
    table = runner.invoke(main, ["usage", "--database", db, "--group-by", "model"])
    assert table.exit_code == 0 and "m-a" in table.output and "m-b" in table.output
    csv = runner.invoke(main, ["usage", "--database", db, "--group-by", "day,model", "--format", "csv"])
    assert csv.exit_code == 0 and csv.output.splitlines()[0].startswith("day,")
    bad = runner.invoke(main, ["usage", "--database", db, "--since", "yesterday-ish"])
    assert bad.exit_code == 2 and "--since" in bad.output
