"""Prometheus metrics: what each record adds, bounded cardinality, the exposition, several workers."""

from __future__ import annotations

import asyncio
import os
import random
import string
import subprocess
import sys
import textwrap
import time

import aiohttp
import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from meter.records import Outcome, UsageSource
from meter.sinks.prometheus import (
    OBSERVE_ERROR_KINDS,
    LabelBudget,
    ProxyMetrics,
    error_type,
    exposition_registry,
)
from tests.conftest import wait_for
from tests.conftest_db import make_record
from tests.support.paths import ROOT
from tests.support.processes import meter_process, simulator_process
from tests.support.prometheus import promtool

CHAT = "/v1/chat/completions"


def _metrics(**kwargs: object) -> tuple[ProxyMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return ProxyMetrics(registry, process_metrics=False, **kwargs), registry  # type: ignore[arg-type]


def _series(registry: CollectorRegistry) -> list[tuple[str, dict[str, str]]]:
    return [(s.name, s.labels) for family in registry.collect() for s in family.samples]


def test_a_streamed_record_feeds_every_family():
    metrics, registry = _metrics()
    record = make_record(
        requested_model="m-a",
        response_model="accounts/x/m-a",
        stream=True,
        prompt_tokens=100,
        completion_tokens=11,
        cached_tokens=40,
        reasoning_tokens=5,
        total_tokens=111,
        duration_ms=1200.0,
        ttft_ms=200.0,
        overhead_ms=0.4,
        server_ttft_ms=150.0,
        server_processing_ms=1100.0,
    )
    metrics.publish(record)
    get = registry.get_sample_value
    team_model = {"team": "unassigned", "model": "m-a"}
    assert get("meter_requests_total", {**team_model, "endpoint": CHAT, "status_code": "200"}) == 1
    for kind, count in (("prompt", 100), ("completion", 11), ("cached_prompt", 40), ("reasoning", 5)):
        assert get("meter_tokens_total", {**team_model, "type": kind}) == count
    assert get("meter_usage_source_total", {"source": "reported"}) == 1
    duration = {**team_model, "endpoint": CHAT, "stream": "true"}
    assert get("meter_request_duration_seconds_sum", duration) == pytest.approx(1.2)
    assert get("meter_request_duration_seconds_bucket", {**duration, "le": "1.0"}) == 0
    assert get("meter_request_duration_seconds_bucket", {**duration, "le": "2.5"}) == 1
    assert get("meter_time_to_first_token_seconds_sum", team_model) == pytest.approx(0.2)
    # (1.2 s - 0.2 s) over the 10 tokens after the first
    assert get("meter_time_per_output_token_seconds_sum", team_model) == pytest.approx(0.1)
    assert get("meter_upstream_time_to_first_token_seconds_sum", {"model": "m-a"}) == pytest.approx(0.15)
    assert get("meter_upstream_processing_seconds_sum", {"model": "m-a"}) == pytest.approx(1.1)
    assert get("meter_overhead_seconds_bucket", {"le": "0.0005"}) == 1
    assert get("meter_overhead_seconds_bucket", {"le": "0.00025"}) == 0
    assert not any(name == "meter_request_errors_total" for name, _ in _series(registry))
    assert get("meter_build_info", {"version": __import__("meter").__version__}) == 1


def test_not_reported_tokens_are_not_counted_as_zero_and_non_streams_have_no_ttft():
    metrics, registry = _metrics()
    metrics.publish(make_record(requested_model="m", usage_source=UsageSource.MISSING, duration_ms=5.0))
    names = {name for name, _ in _series(registry)}
    assert "meter_tokens_total" not in names
    assert "meter_time_to_first_token_seconds_count" not in names
    assert registry.get_sample_value("meter_usage_source_total", {"source": "missing"}) == 1


@pytest.mark.parametrize(
    ("outcome", "status", "expected"),
    [
        (Outcome.OK, 200, None),
        (Outcome.UPSTREAM_ERROR, 429, "429"),
        (Outcome.UPSTREAM_ERROR, 503, "503"),
        (Outcome.UPSTREAM_ERROR, 200, "stream_error"),
        (Outcome.ABORTED, 499, "aborted"),
        (Outcome.ABORTED, 200, "aborted"),
        (Outcome.PROXY_ERROR, 502, "upstream_failed"),
        (Outcome.PROXY_ERROR, 504, "upstream_timeout"),
        (Outcome.PROXY_ERROR, 413, "request_too_large"),
        (Outcome.PROXY_ERROR, 400, "invalid_request"),
        (Outcome.PROXY_ERROR, 408, "request_timeout"),
        (Outcome.PROXY_ERROR, 500, "internal_error"),
        (Outcome.PROXY_ERROR, 599, "proxy_error"),
    ],
)
def test_error_type_vocabulary(outcome, status, expected):
    record = make_record(outcome=outcome, status_code=status, requested_model="m")
    assert error_type(record) == expected
    metrics, registry = _metrics()
    metrics.publish(
        make_record(outcome=Outcome.OK, status_code=200, requested_model="m")
    )  # "m" earns its label
    metrics.publish(record)
    value = registry.get_sample_value(
        "meter_request_errors_total", {"team": "unassigned", "model": "m", "error_type": expected or ""}
    )
    assert value == (None if expected is None else 1)


def test_a_model_name_earns_its_label_only_from_a_request_that_succeeded():
    metrics, registry = _metrics()
    metrics.publish(make_record(outcome=Outcome.UPSTREAM_ERROR, status_code=404, requested_model="junk"))
    labels = {"team": "unassigned", "model": "other", "error_type": "404"}
    assert registry.get_sample_value("meter_request_errors_total", labels) == 1
    metrics.publish(make_record(outcome=Outcome.OK, status_code=200, requested_model="junk"))
    metrics.publish(make_record(outcome=Outcome.UPSTREAM_ERROR, status_code=404, requested_model="junk"))
    labels["model"] = "junk"
    assert registry.get_sample_value("meter_request_errors_total", labels) == 1


def test_known_label_values_exist_at_zero_before_any_traffic():
    _, registry = _metrics()
    get = registry.get_sample_value
    for source in ("reported", "estimated", "missing"):
        assert get("meter_usage_source_total", {"source": source}) == 0
    for kind in OBSERVE_ERROR_KINDS:
        assert get("meter_observe_errors_total", {"kind": kind}) == 0
    assert get("meter_telemetry_dropped_total", {"signal": "spans", "reason": "queue_full"}) == 0
    assert get("meter_inflight_requests", {"endpoint": CHAT}) == 0
    assert get("meter_label_overflow_total", {"label": "model"}) == 0


def test_team_label_is_a_known_team_unassigned_or_other():
    metrics, registry = _metrics(teams=["search", "ads"], max_teams=1)
    assert metrics.team_label("") == "unassigned"
    assert metrics.team_label(None) == "unassigned"
    assert metrics.team_label("search") == "search"
    assert metrics.team_label("ads") == "ads"
    assert metrics.team_label("new-1") == "new-1"  # the one slot beyond the known teams
    assert metrics.team_label("new-2") == "other"
    assert registry.get_sample_value("meter_label_overflow_total", {"label": "team"}) == 1
    metrics.publish(make_record(team="search", requested_model="m"))
    assert (
        registry.get_sample_value(
            "meter_requests_total", {"team": "search", "model": "m", "endpoint": CHAT, "status_code": "200"}
        )
        == 1
    )


def test_configured_models_keep_their_label_past_the_cap():
    budget = LabelBudget(2, preset=["configured"])
    assert [budget(m) for m in ("a", "b", "c", "configured", "a", None)] == [
        "a",
        "b",
        "other",
        "configured",
        "a",
        "other",
    ]


def _random_model(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=24))


def test_ten_thousand_random_model_names_keep_the_series_bounded():
    metrics, registry = _metrics(max_models=100)
    rng = random.Random(7)

    def observe(count: int) -> None:
        for _ in range(count):
            model = _random_model(rng)
            metrics.publish(
                make_record(
                    requested_model=model,
                    response_model=model + "-resolved",
                    stream=True,
                    prompt_tokens=3,
                    completion_tokens=4,
                    duration_ms=10.0,
                    ttft_ms=2.0,
                    server_ttft_ms=1.0,
                )
            )

    observe(200)  # past the cap of 100: "other" exists from here on
    series_at_cap = len(_series(registry))
    observe(9_800)
    series = _series(registry)
    assert len(series) == series_at_cap < 10_000  # 9,800 more distinct names, not one more series
    models = {labels["model"] for _, labels in series if "model" in labels}
    assert len(models) == 101 and "other" in models
    assert registry.get_sample_value("meter_label_overflow_total", {"label": "model"}) == 9_900


def test_cost_is_observed_from_the_records_cost():
    base = {"requested_model": "m", "prompt_tokens": 10, "completion_tokens": 2}
    metrics, registry = _metrics()
    metrics.publish(make_record(**base, cost_nanos=125_000, price_ref="db:1"))  # $0.000125
    metrics.publish(make_record(**base, cost_nanos=500_000_000, price_ref="db:1"))  # $0.5
    metrics.publish(make_record(**base))  # used tokens, nothing priced it: unpriced
    metrics.publish(make_record(requested_model="m"))  # no usage: nothing to price, not unpriced
    get = registry.get_sample_value
    assert get("meter_cost_usd_total", {"team": "unassigned", "model": "m"}) == pytest.approx(0.500125)
    assert get("meter_unpriced_requests_total", {"team": "unassigned", "model": "m"}) == 1


# --- through the real proxy ------------------------------------------------------------------------


@pytest.mark.slow
def test_ten_thousand_random_model_names_through_the_proxy(tmp_path):
    rng = random.Random(11)
    models = [_random_model(rng) for _ in range(10_000)]
    body = {"max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    headers = {"Authorization": "Bearer fw-cardinality-0000"}

    def send_all(base_url: str, names: list[str]) -> None:
        async def run() -> None:  # aiohttp: the fastest client at hand, so the test takes seconds
            connector = aiohttp.TCPConnector(limit=16)
            async with aiohttp.ClientSession(base_url, connector=connector, headers=headers) as client:
                pending = iter(names)

                async def worker() -> None:
                    for model in pending:
                        async with client.post("/v1/chat/completions", json={**body, "model": model}) as r:
                            assert r.status == 200
                            await r.read()

                await asyncio.gather(*(worker() for _ in range(16)))

        asyncio.run(run())

    def scrape(url: str) -> tuple[str, list[Sample]]:
        text = httpx.get(f"{url}/metrics").text
        return text, [s for family in text_string_to_metric_families(text) for s in family.samples]

    def requests_counted(url: str) -> float:
        return sum(s.value for s in scrape(url)[1] if s.name == "meter_requests_total")

    with (
        simulator_process(tmp_path) as sim,
        meter_process(tmp_path, sim.url, f"sqlite:///{tmp_path / 'meter.db'}") as meter,
    ):
        send_all(meter.url, models[:200])
        wait_for(lambda: requests_counted(meter.url) == 200, 30, "200 requests counted")
        _, series_at_cap = scrape(meter.url)
        send_all(meter.url, models[200:])
        wait_for(lambda: requests_counted(meter.url) == 10_000, 60, "10,000 requests counted")
        text, series = scrape(meter.url)
    assert len(series) == len(series_at_cap) < 10_000  # 9,800 more names, not one more series
    models_seen = {s.labels["model"] for s in series if "model" in s.labels}
    assert len(models_seen) == 101 and "other" in models_seen
    assert not any(model in text for model in models[200:])
    other = [s.value for s in series if s.name == "meter_requests_total" and s.labels["model"] == "other"]
    assert other == [9_900]


def test_exposition_passes_promtool_and_parses_as_openmetrics(meter):
    key = "fw-exposition-key-wxyz"  # a letter suffix: digits could occur in any float sample
    client = httpx.Client(base_url=meter.base_url, headers={"Authorization": f"Bearer {key}"})
    body = {"model": "m-a", "max_tokens": 3, "messages": [{"role": "user", "content": "a b"}]}
    client.post("/chat/completions", json=body)
    client.post("/chat/completions", json={**body, "stream": True})
    client.post("/chat/completions", json=body, headers={"x-sim-error": "503"})
    meter.rows(3)
    text = httpx.get(f"{meter.url}/metrics").text
    assert key not in text and key[-4:] not in text
    check = subprocess.run(
        [promtool(), "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    om = httpx.get(f"{meter.url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    families = {f.name: f for f in openmetrics_families(om.text)}
    errors = [s for s in families["meter_request_errors"].samples if s.name == "meter_request_errors_total"]
    assert [(s.labels["error_type"], s.value) for s in errors] == [("503", 1.0)]


# --- several processes -----------------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import sys
    from prometheus_client import CollectorRegistry
    from meter.sinks.prometheus import ProxyMetrics
    from tests.conftest_db import make_record

    metrics = ProxyMetrics(CollectorRegistry())
    for _ in range(int(sys.argv[1])):
        metrics.publish(make_record(requested_model="m", prompt_tokens=2, duration_ms=5.0))
    metrics.inflight.labels("/v1/chat/completions").inc()
    print("done", flush=True)
    sys.stdin.read()  # stay alive: in-flight is a live gauge
    """
)


@pytest.mark.integration
def test_multiprocess_files_add_up_across_processes(tmp_path):
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(n)],
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        for n in (3, 4)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"done"
        registry = exposition_registry(CollectorRegistry(), str(tmp_path))
        get = registry.get_sample_value
        labels = {"team": "unassigned", "model": "m", "endpoint": CHAT, "status_code": "200"}
        assert get("meter_requests_total", labels) == 7
        assert get("meter_tokens_total", {"team": "unassigned", "model": "m", "type": "prompt"}) == 14
        assert get("meter_inflight_requests", {"endpoint": CHAT}) == 2
        inflight = [s for f in registry.collect() if f.name == "meter_inflight_requests" for s in f.samples]
        assert inflight and all("pid" not in s.labels for s in inflight)  # summed, not one per process
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_meter_serve_with_two_workers_counts_every_request_in_every_scrape(tmp_path, simulator):
    metrics_dir = tmp_path / "prometheus-multiproc"
    process = meter_process(
        tmp_path,
        simulator.url,
        f"sqlite:///{tmp_path / 'meter.db'}",
        "--workers",
        "2",
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )
    total = 80
    with process:
        body = {"model": "m-w", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
        headers = {"Authorization": "Bearer fw-workers-1234", "Connection": "close"}

        def pids_recorded() -> set[str]:
            return {p.stem.rsplit("_", 1)[-1] for p in metrics_dir.glob("counter_*.db")}

        # New connections until both workers have taken requests (the kernel spreads accepts).
        sent = 0
        deadline = time.monotonic() + 30
        while sent < total or len(pids_recorded()) < 2:
            assert time.monotonic() < deadline, f"only workers {pids_recorded()} served requests"
            assert (
                httpx.post(f"{process.url}/v1/chat/completions", json=body, headers=headers).status_code
                == 200
            )
            sent += 1
        labels = {"team": "unassigned", "model": "m-w", "endpoint": CHAT, "status_code": "200"}

        def scrape() -> dict[str, float]:
            text = httpx.get(f"{process.url}/metrics", headers={"Connection": "close"}).text
            values: dict[str, float] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "meter_requests_total" and sample.labels == labels:
                        values["requests"] = sample.value
                    if sample.name == "meter_inflight_requests" and sample.labels == {"endpoint": CHAT}:
                        values["inflight"] = sample.value
            return values

        for _ in range(8):  # whichever worker answers, the counters are the sum over both
            assert scrape() == {"requests": float(sent), "inflight": 0.0}
        assert len(pids_recorded()) == 2
