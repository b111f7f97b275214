"""Every dashboard panel and alert rule, run by a real Prometheus scraping meter under varied traffic.

A Prometheus (Debian's package) scrapes meter every second while the simulator answers a mix of
endpoints, models, streams, upstream errors, errors inside streams and client aborts. Then each
PromQL expression of each dashboard panel (Grafana variables set to "All") and each alert rule goes
through Prometheus' HTTP API: it must be valid and return series. An alert expression that is quiet
(its threshold not crossed) returns nothing by design, so it is also run in its ``bool`` form
(``x > bool 0.05``), which must return the series the rule watches. The rules themselves are loaded
into that Prometheus and must evaluate without error, and the alerts this traffic provokes must fire.

Expressions over metrics that cannot have data in this build are listed in :func:`pending_metrics`
with the reason; each reason is checked, so the list empties itself as the features land.
"""

from __future__ import annotations

import random
import re
import threading
import time
from datetime import datetime

import httpx
import pytest

from meter.records import UsageRecord
from tests.conftest import wait_for
from tests.support.prometheus import (
    Expression,
    PrometheusServer,
    PromQLError,
    alert_expressions,
    alert_rules,
    comparisons_as_bool,
    dashboard_expressions,
    referenced_metrics,
)

KEY = "fw-prometheus-test-key-0001"
CAPPED_KEY = "fw-prometheus-capped-key-0002"  # in team "capped", whose small budget runs out mid-traffic
ADMIN = "prometheus-test-admin-token-0123456789"
MODELS = ("accounts/fireworks/models/llama-v3p1-8b-instruct", "m-small", "m-large")
QUOTA_METRICS = ("meter_quota_rejections_total", "meter_team_budget_usd", "meter_team_spend_usd")
PIPELINE_METRICS = (
    "meter_journal_pending_events",
    "meter_journal_oldest_pending_age_seconds",
    "meter_writer_events_written_total",
    "meter_writer_errors_total",
    "meter_journal_dead_lettered_total",
    "meter_journal_dropped_events_total",
    "meter_journal_append_errors_total",
    "meter_writer_batch_size",
    "meter_writer_write_duration_seconds",
)


def _family(series: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", series)


def _exported(exposition: str, series: str) -> bool:
    return bool(re.search(rf"^# TYPE ({re.escape(series)}|{re.escape(_family(series))}) ", exposition, re.M))


def pending_metrics(exposition: str) -> dict[str, str]:
    """Metrics dashboards and alerts use that cannot have data in this build, with the reason."""
    pending: dict[str, str] = {}
    if not hasattr(UsageRecord, "cost_usd"):
        reason = "prices land with the pricing issue: UsageRecord has no cost_usd yet"
        pending["meter_cost_usd_total"] = pending["meter_unpriced_requests_total"] = reason
    quota_wired = _exported(exposition, "meter_quota_rejections_total")
    for name in QUOTA_METRICS:
        if not _exported(exposition, name):
            assert not quota_wired, (
                f"quota metrics are exported but {name} is not: export it or fix the rules"
            )
            pending[name] = "quotas land with the quota issue: no quota rules in this build"
    for name in PIPELINE_METRICS:
        if not _exported(exposition, name):
            pending[name] = "the journal pipeline registers it on meter's registry once it is wired in"
            pending[name + "_bucket"] = pending[name + "_sum"] = pending[name + "_count"] = pending[name]
    return pending


def drive_traffic(base_url: str, seconds: float, workers: int = 4) -> int:
    """Varied requests for ``seconds`` (bounded in time and count); returns how many were sent."""
    auth = {"Authorization": f"Bearer {KEY}"}
    messages = [{"role": "user", "content": "tell me about metering proxies please"}]

    def chat(client: httpx.Client, rng: random.Random, **extra: object) -> None:
        body = {"model": rng.choice(MODELS), "messages": messages, "max_tokens": rng.randint(2, 12), **extra}
        headers = {**auth, "x-sim-ttft-ms": str(rng.randint(5, 40))}
        if rng.random() < 0.3:
            headers["x-sim-cached-tokens"] = "3"
        client.post("/chat/completions", json=body, headers=headers)

    def stream(client: httpx.Client, rng: random.Random) -> None:
        body = {
            "model": rng.choice(MODELS),
            "messages": messages,
            "max_tokens": rng.randint(3, 12),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {**auth, "x-sim-ttft-ms": str(rng.randint(5, 60)), "x-sim-token-delay-ms": "1"}
        with client.stream("POST", "/chat/completions", json=body, headers=headers) as response:
            response.read()

    def abort(client: httpx.Client, rng: random.Random) -> None:
        body = {"model": rng.choice(MODELS), "messages": messages, "max_tokens": 200, "stream": True}
        headers = {**auth, "x-sim-token-delay-ms": "20"}
        with (
            httpx.Client(base_url=base_url, timeout=10) as own,  # closed mid-stream: a client abort
            own.stream("POST", "/chat/completions", json=body, headers=headers) as response,
        ):
            next(response.iter_raw())

    def error(client: httpx.Client, rng: random.Random) -> None:
        failure = rng.choice(["500", "503", "429", "400", "midstream"])
        body = {"model": rng.choice(MODELS), "messages": messages, "max_tokens": 5, "stream": True}
        with client.stream(
            "POST", "/chat/completions", json=body, headers={**auth, "x-sim-error": failure}
        ) as r:
            r.read()

    def capped(client: httpx.Client, rng: random.Random) -> None:
        body = {"model": MODELS[0], "messages": messages, "max_tokens": rng.randint(2, 12)}
        client.post("/chat/completions", json=body, headers={"Authorization": f"Bearer {CAPPED_KEY}"})

    scenarios = [
        (lambda c, r: chat(c, r), 4),
        (capped, 1),
        (stream, 4),
        (
            lambda c, r: c.post(
                "/completions",
                json={"model": r.choice(MODELS), "prompt": "a b", "max_tokens": 4},
                headers=auth,
            ),
            1,
        ),
        (lambda c, r: c.post("/embeddings", json={"model": "m-embed", "input": "a b c"}, headers=auth), 1),
        (
            lambda c, r: c.post(
                "/responses",
                json={"model": r.choice(MODELS), "input": "hi", "stream": True, "max_output_tokens": 4},
                headers=auth,
            ).read(),
            1,
        ),
        (error, 3),
        (abort, 1),
    ]
    choices = [s for s, weight in scenarios for _ in range(weight)]
    sent = [0] * workers
    deadline = time.monotonic() + seconds

    def run(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=base_url, timeout=10) as client:
            while time.monotonic() < deadline and sent[index] < 5_000:
                rng.choice(choices)(client, rng)
                sent[index] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    return sum(sent)


def _scalar(prometheus: PrometheusServer, expr: str) -> float | None:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else None


@pytest.mark.slow
def test_every_dashboard_and_alert_expression_returns_series(tmp_path, start_meter, simulator):
    meter = start_meter(simulator.url, admin_token=ADMIN)
    with httpx.Client(base_url=f"{meter.url}/admin/v1", headers={"Authorization": f"Bearer {ADMIN}"}) as api:
        api.post("/teams", json={"name": "capped"}).raise_for_status()
        api.post("/teams/capped/keys", json={"kind": "passthrough", "key": CAPPED_KEY}).raise_for_status()
        api.put("/teams/capped/limits", json={"budget_usd": "0.00005", "rpm": 100000}).raise_for_status()
    with PrometheusServer(tmp_path, [meter.url.removeprefix("http://")]) as prometheus:
        wait_for(lambda: prometheus.query('up{job="meter"} == 1'), 20, "Prometheus' first scrape of meter")
        sent = drive_traffic(meter.base_url, seconds=6)
        assert sent > 100
        print(f"\n{sent} requests")
        meter.rows(sent, timeout=20)  # a record for every request
        wait_for(
            lambda: _scalar(prometheus, "sum(meter_requests_total)") == sent,
            20,
            "a scrape with every request",
        )
        counted_at = time.time()
        wait_for(  # two more scrapes, so every series has the two samples rate() needs
            lambda: (_scalar(prometheus, 'timestamp(up{job="meter"})') or 0) > counted_at + 1.5,
            20,
            "two more scrapes",
        )
        wait_for(
            lambda: _rules_evaluated_after(prometheus, counted_at + 1.5), 30, "a rule evaluation after that"
        )

        exposition = httpx.get(f"{meter.url}/metrics").text
        pending = pending_metrics(exposition)
        expressions: list[tuple[Expression, str]] = [(e, e.expr) for e in dashboard_expressions()]
        expressions += [(e, comparisons_as_bool(e.expr)) for e in alert_expressions()]
        failures, explained = [], []
        for expression, query in expressions:
            try:
                result = prometheus.query(query)
                if query != expression.expr:
                    prometheus.query(expression.expr)  # the rule as written is valid too
            except PromQLError as exc:
                failures.append(f"{expression.source}: invalid: {exc}")
                continue
            if result:
                continue
            empty = sorted(
                m for m in referenced_metrics(query) if not prometheus.query(f'count({{__name__="{m}"}})')
            )
            unexplained = [m for m in empty if m not in pending]
            if empty and not unexplained:
                explained.append(f"{expression.source}: {'; '.join(sorted({pending[m] for m in empty}))}")
            else:
                failures.append(
                    f"{expression.source}: no series (metrics without data: {unexplained or empty})"
                )
        print("\nexpressions without data, and why:\n  " + "\n  ".join(explained))
        assert not failures, "\n".join(failures)
        assert len(expressions) - len(explained) >= 40  # most of them really ran against data

        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        assert len(rules) == len(alert_rules())
        assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
        active = {alert["labels"]["alertname"] for alert in prometheus.api("alerts")["alerts"]}
        # The traffic fails ~13% of the chat models' requests server-side (500, 503, midstream; 429 and
        # 400 are the client's) and ~27% of records lack reported usage (upstream errors, aborts).
        assert {"MeterHighErrorRate", "MeterUsageNotReported"} <= active, active


def _rules_evaluated_after(prometheus: PrometheusServer, when: float) -> bool:
    for group in prometheus.api("rules")["groups"]:
        last = group.get("lastEvaluation", "")
        if not last or last.startswith("0001"):
            return False
        stamp = datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", last.replace("Z", "+00:00")))
        if stamp.timestamp() < when:
            return False
    return True
