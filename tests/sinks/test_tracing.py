"""OpenTelemetry: GenAI spans and metrics (SDK in-memory exporter and reader), W3C propagation to the
upstream, configuration from OTEL_* variables (a real OTLP/HTTP receiver on loopback), fail-open."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from meter.app import MeterApp, create_app
from meter.errors import TelemetryConfigError
from meter.records import UsageRecord
from meter.settings import load_settings
from meter.sinks.genai_conventions import provider_name
from meter.sinks.genai_metrics import GenAIMetrics
from meter.sinks.otel_config import configure_from_environment
from meter.sinks.prometheus import LabelBudget, ProxyMetrics
from meter.sinks.requestlog import CURRENT_TRACE_ID
from meter.sinks.span_export import CountingBatchSpanProcessor
from meter.sinks.tracing import GenAITracer
from meter.tap.request import RequestInfo
from tests.conftest import wait_for
from tests.conftest_db import make_record
from tests.support.serve import serve_in_thread

KEY = "fw-trace-SECRET-key-wxyz"  # a suffix no hex id (trace, span, event) can contain by chance
PROMPT = "zebra quokka narwhal"
MESSAGES = [{"role": "user", "content": PROMPT}]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@dataclass
class Traced:
    url: str
    app: MeterApp
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    emitted: list[UsageRecord]

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def finished(self, count: int) -> list[ReadableSpan]:
        wait_for(lambda: len(self.spans.get_finished_spans()) >= count, message=f"{count} spans")
        spans = list(self.spans.get_finished_spans())
        assert len(spans) == count
        return spans

    def metric_points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        return [
            point
            for resource in (data.resource_metrics if data else [])
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


@pytest.fixture
def traced(tmp_path: Path, simulator) -> Iterator[Traced]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    settings = load_settings(
        {"METER_DATABASE_URL": f"sqlite:///{tmp_path / 'meter.db'}", "METER_UPSTREAM_URL": simulator.url}
    )
    emitted: list[UsageRecord] = []
    app = create_app(
        settings,
        registry=CollectorRegistry(),
        tracer=GenAITracer(provider, upstream_url=simulator.url),
        meter_provider=MeterProvider(metric_readers=[reader]),
        sinks=[emitted.append],
    )
    with serve_in_thread(app, lifespan="on") as server:
        yield Traced(server.url, app, spans, reader, emitted)


def _client(traced: Traced) -> openai.OpenAI:
    return openai.OpenAI(base_url=traced.base_url, api_key=KEY, max_retries=0)


def test_chat_span_follows_the_genai_conventions_and_covers_the_request(traced, simulator):
    reply = _client(traced).chat.completions.create(
        model="m-a", messages=MESSAGES, max_tokens=5, temperature=0.5, top_p=0.9
    )
    (span,) = traced.finished(1)
    (record,) = traced.emitted
    assert span.name == "chat m-a"
    assert span.kind is SpanKind.CLIENT
    attributes = dict(span.attributes or {})
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",  # the simulator is on 127.0.0.1, not *.fireworks.ai
        "gen_ai.request.model": "m-a",
        "gen_ai.request.stream": False,
        "gen_ai.request.max_tokens": 5,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.response.model": reply.model,
        "gen_ai.response.id": reply.id,
        "gen_ai.response.finish_reasons": ("length",),
        "gen_ai.usage.input_tokens": reply.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": reply.usage.completion_tokens,
        "gen_ai.usage.cache_read.input_tokens": 0,  # the simulator reports cached tokens, here none
        "server.address": "127.0.0.1",
        "server.port": int(simulator.url.rsplit(":", 1)[1]),
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "meter.team": "unassigned",
        "meter.event_id": record.event_id,
        "meter.outcome": "ok",
        "meter.usage_source": "reported",
        "meter.overhead_ms": record.overhead_ms,
    }
    assert span.status.status_code is StatusCode.UNSET
    # From the request's arrival (the proxy's clock) to after its last byte.
    started_ns = int(record.started_at.timestamp() * 1_000_000) * 1000
    assert abs(span.start_time - started_ns) < 2_000
    assert span.end_time - span.start_time >= record.duration_ms * 1e6


def test_stream_span_has_stream_attributes(traced):
    stream = _client(traced).chat.completions.create(
        model="m-s", messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    (span,) = traced.finished(1)
    (record,) = traced.emitted
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.request.stream"] is True
    assert attributes["gen_ai.usage.output_tokens"] == 6 == chunks[-1].usage.completion_tokens
    assert attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(record.ttft_ms / 1000)
    assert attributes["gen_ai.response.id"] == chunks[0].id


def test_client_trace_is_continued_and_propagated_to_the_upstream(traced, simulator):
    headers = {
        "Authorization": f"Bearer {KEY}",
        "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
        "tracestate": "vendor=opaque",
    }
    body = {"model": "m-a", "messages": MESSAGES, "max_tokens": 2}
    assert httpx.post(f"{traced.base_url}/chat/completions", json=body, headers=headers).status_code == 200
    (span,) = traced.finished(1)
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
    received = simulator.sim.received[-1]
    assert received.header("traceparent") == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"
    assert received.header("tracestate") == "vendor=opaque"
    assert [name for name, _ in received.headers].count("traceparent") == 1


def test_a_request_without_trace_context_starts_a_trace_the_upstream_joins(traced, simulator):
    _client(traced).embeddings.create(model="m-e", input="hello")
    (span,) = traced.finished(1)
    assert span.parent is None and span.name == "embeddings m-e"
    context = span.context
    expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert context.trace_flags.sampled
    assert simulator.sim.received[-1].header("traceparent") == expected


def test_an_unsampled_client_trace_is_propagated_but_not_recorded(traced, simulator):
    headers = {"Authorization": f"Bearer {KEY}", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"}
    body = {"model": "m-a", "messages": MESSAGES, "max_tokens": 2}
    assert httpx.post(f"{traced.base_url}/chat/completions", json=body, headers=headers).status_code == 200
    wait_for(lambda: traced.emitted, message="the record")
    assert traced.spans.get_finished_spans() == ()
    traceparent = simulator.sim.received[-1].header("traceparent")
    assert traceparent.startswith(f"00-{TRACE_ID}-") and traceparent.endswith("-00")


@pytest.mark.parametrize(
    ("headers", "stream", "error_type"),
    [({"x-sim-error": "503"}, False, "503"), ({"x-sim-error": "midstream"}, True, "stream_error")],
)
def test_failed_requests_carry_error_type_and_error_status(traced, headers, stream, error_type):
    body = {"model": "m-x", "messages": MESSAGES, "max_tokens": 8, "stream": stream}
    httpx.post(
        f"{traced.base_url}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}", **headers},
    )
    (span,) = traced.finished(1)
    assert span.attributes["error.type"] == error_type
    assert span.status.status_code is StatusCode.ERROR and span.status.description == error_type


def test_spans_hold_no_key_and_no_content(traced):
    client = _client(traced)
    client.chat.completions.create(model="m-a", messages=MESSAGES, max_tokens=3)
    list(client.chat.completions.create(model="m-a", messages=MESSAGES, max_tokens=3, stream=True))
    client.responses.create(model="m-r", input=PROMPT, max_output_tokens=3)
    httpx.post(
        f"{traced.base_url}/chat/completions",
        json={"model": "m-a", "messages": MESSAGES},
        headers={"Authorization": f"Bearer {KEY}", "x-sim-error": "400"},
    )
    spans = traced.finished(4)
    dumped = "".join(span.to_json() for span in spans)
    assert KEY not in dumped and KEY[-4:] not in dumped
    for word in PROMPT.split():
        assert word not in dumped
    assert "Simulated" not in dumped  # upstream error messages may quote the prompt: never exported


def test_genai_metrics_are_recorded_per_request(traced):
    client = _client(traced)
    client.chat.completions.create(model="m-a", messages=MESSAGES, max_tokens=3)
    list(
        client.chat.completions.create(
            model="m-a", messages=MESSAGES, max_tokens=7, stream=True, stream_options={"include_usage": True}
        )
    )
    client.embeddings.create(model="m-e", input="one two")
    httpx.get(f"{traced.base_url}/models", headers={"Authorization": f"Bearer {KEY}"})  # not a GenAI call
    wait_for(lambda: len(traced.emitted) == 4, message="4 records")
    by_type: dict[str, int] = {}
    for point in traced.metric_points("gen_ai.client.token.usage"):
        token_type = point.attributes["gen_ai.token.type"]
        by_type[token_type] = by_type.get(token_type, 0) + int(point.sum)
        assert point.attributes["gen_ai.provider.name"] == "openai"
        assert point.attributes["meter.team"] == "unassigned"
    records = traced.emitted[:3]
    assert by_type["input"] == sum(r.prompt_tokens for r in records)
    assert by_type["output"] == sum(r.completion_tokens or 0 for r in records)
    durations = traced.metric_points("gen_ai.client.operation.duration")
    assert sum(p.count for p in durations) == 3
    assert {p.attributes["gen_ai.operation.name"] for p in durations} == {"chat", "embeddings"}
    (ttft,) = traced.metric_points("gen_ai.server.time_to_first_token")
    assert ttft.count == 1 and ttft.attributes["gen_ai.request.model"] == "m-a"
    (tpot,) = traced.metric_points("gen_ai.server.time_per_output_token")
    assert tpot.count == 1


def test_genai_metric_model_attributes_are_bounded():
    reader = InMemoryMetricReader()
    sink = GenAIMetrics(
        MeterProvider(metric_readers=[reader]),
        upstream_url="https://api.fireworks.ai/inference",
        model_label=LabelBudget(2),
    )
    for i in range(50):
        sink(make_record(requested_model=f"random-{i}", duration_ms=3.0, prompt_tokens=1))
    data = reader.get_metrics_data()
    models = {
        point.attributes["gen_ai.request.model"]
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
    }
    assert models == {"random-0", "random-1", "other"}
    points = data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    assert {p.attributes["gen_ai.provider.name"] for p in points} == {"fireworks"}


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.fireworks.ai", "fireworks"),
        ("fireworks.ai", "fireworks"),
        ("API.Fireworks.AI.", "fireworks"),
        ("notfireworks.ai", "openai"),
        ("api.openai.com", "openai"),
        ("127.0.0.1", "openai"),
        (None, "openai"),
    ],
)
def test_provider_name(host, expected):
    assert provider_name(host) == expected


def test_tracing_is_off_by_default_and_the_proxy_calls_nothing(start_meter, simulator):
    meter = start_meter(simulator.url)
    runtime = meter.app.runtime
    assert runtime.tracer is None and runtime.meter_provider is None
    assert meter.app.proxy._tracer is None  # the proxy's only tracing code is `if self._tracer is not None`
    assert not any(isinstance(sink, GenAIMetrics) for sink in runtime.sinks)


class _BrokenTracer:
    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("tracer is broken")


class _BrokenProvider:
    def get_tracer(self, *args: Any, **kwargs: Any) -> _BrokenTracer:
        return _BrokenTracer()


def test_a_failing_tracer_never_breaks_forwarding(tmp_path, simulator, caplog):
    settings = load_settings(
        {"METER_DATABASE_URL": f"sqlite:///{tmp_path / 'meter.db'}", "METER_UPSTREAM_URL": simulator.url}
    )
    tracer = GenAITracer(_BrokenProvider(), upstream_url=simulator.url)  # type: ignore[arg-type]
    emitted: list[UsageRecord] = []
    app = create_app(settings, registry=CollectorRegistry(), tracer=tracer, sinks=[emitted.append])
    with serve_in_thread(app, lifespan="on") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        for _ in range(3):
            assert client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2).usage
        wait_for(lambda: len(emitted) == 3, message="3 records")
    assert simulator.sim.received[-1].header("traceparent") is None
    assert sum("tracing failed" in r.getMessage() for r in caplog.records) == 1  # logged once


# --- dropped spans ---------------------------------------------------------------------------------


class _BlockingExporter(SpanExporter):
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Any) -> SpanExportResult:
        self.entered.set()
        self.release.wait(10)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


class _FailingExporter(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.FAILURE


def _end_spans(provider: TracerProvider, count: int) -> None:
    tracer = provider.get_tracer("test")
    for _ in range(count):
        tracer.start_span("s").end()


def test_a_full_span_queue_drops_and_counts():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, process_metrics=False)
    exporter = _BlockingExporter()
    provider = TracerProvider()
    provider.add_span_processor(
        CountingBatchSpanProcessor(
            exporter,
            on_drop=metrics.telemetry_dropped,
            max_queue_size=4,
            max_export_batch_size=4,
            schedule_delay_millis=60_000,
        )
    )
    _end_spans(provider, 4)  # a full batch: the exporter takes it and blocks
    assert exporter.entered.wait(10)
    _end_spans(provider, 10)  # 4 fit in the queue, 6 are dropped
    dropped = {"signal": "spans", "reason": "queue_full"}
    assert registry.get_sample_value("meter_telemetry_dropped_total", dropped) == 6
    exporter.release.set()
    provider.shutdown()
    assert exporter.exported == 8


def test_a_failed_export_counts_its_spans():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, process_metrics=False)
    provider = TracerProvider()
    provider.add_span_processor(
        CountingBatchSpanProcessor(_FailingExporter(), on_drop=metrics.telemetry_dropped)
    )
    _end_spans(provider, 3)
    provider.shutdown()
    failed = {"signal": "spans", "reason": "export_failed"}
    assert registry.get_sample_value("meter_telemetry_dropped_total", failed) == 3


# --- configuration from OTEL_* ----------------------------------------------------------------------


class OTLPReceiver:
    """An OTLP/HTTP (protobuf) collector on loopback that keeps what it receives."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.requests.append((scope["path"], headers, body))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-protobuf")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    def traces(self) -> list[ExportTraceServiceRequest]:
        return [ExportTraceServiceRequest.FromString(b) for p, _, b in self.requests if p == "/v1/traces"]

    def metrics(self) -> list[ExportMetricsServiceRequest]:
        return [ExportMetricsServiceRequest.FromString(b) for p, _, b in self.requests if p == "/v1/metrics"]


def _scope(headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"method": "POST", "path": "/v1/chat/completions", "headers": headers or []}


def test_nothing_is_configured_without_otel_variables():
    assert configure_from_environment({}, upstream_url="http://u") == (None, None)
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}
    assert configure_from_environment(disabled, upstream_url="http://u") == (None, None)


@pytest.mark.integration
def test_otlp_endpoint_exports_spans_and_metrics_and_shutdown_drains_them():
    receiver = OTLPReceiver()
    with serve_in_thread(receiver) as server:
        environ = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": server.url,
            "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=meter%20test,authorization=Bearer collector-token",
            "OTEL_SERVICE_NAME": "meter-under-test",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci",
            "OTEL_METRIC_EXPORT_INTERVAL": "3600000",  # only the shutdown flush exports
        }
        tracer, meter_provider = configure_from_environment(
            environ, upstream_url="https://api.fireworks.ai/inference"
        )
        assert tracer is not None and meter_provider is not None
        span = tracer.start(_scope(), RequestInfo(model="accounts/fireworks/models/m", stream=True), 1_000)
        record = make_record(requested_model="accounts/fireworks/models/m", duration_ms=12.0, prompt_tokens=5)
        tracer.finish(span, record)
        GenAIMetrics(meter_provider, upstream_url="https://api.fireworks.ai/inference")(record)
        assert receiver.requests == []  # batched: nothing leaves before the schedule or shutdown
        tracer.shutdown()
        meter_provider.shutdown()  # type: ignore[attr-defined]
    (traces,) = receiver.traces()
    resource_spans = traces.resource_spans[0]
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "meter-under-test"
    assert resource["deployment.environment"] == "ci"
    (exported,) = resource_spans.scope_spans[0].spans
    assert exported.name == "chat accounts/fireworks/models/m"
    attributes = {a.key: a.value for a in exported.attributes}
    assert attributes["gen_ai.provider.name"].string_value == "fireworks"
    assert attributes["server.address"].string_value == "api.fireworks.ai"
    (metrics,) = receiver.metrics()
    names = {m.name for rm in metrics.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"gen_ai.client.operation.duration", "gen_ai.client.token.usage"} <= names
    headers = receiver.requests[0][1]
    assert headers["x-tenant"] == "meter test" and headers["authorization"] == "Bearer collector-token"


def test_per_signal_exporter_choice():
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}
    tracer, meter_provider = configure_from_environment(environ, upstream_url="http://u")
    assert tracer is None and meter_provider is not None
    meter_provider.shutdown(timeout_millis=100)  # type: ignore[attr-defined]
    tracer, meter_provider = configure_from_environment(
        {"OTEL_TRACES_EXPORTER": "console"}, upstream_url="http://u"
    )
    assert tracer is not None and meter_provider is None
    tracer.shutdown()


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "PROTOCOL"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_TRACES_SAMPLER": "traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "2",
            },
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_MAX_QUEUE_SIZE": "lots"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "HEADERS"),
        ({"OTEL_SDK_DISABLED": "maybe"}, "OTEL_SDK_DISABLED"),
    ],
)
def test_malformed_otel_variables_are_refused_by_name(environ, named):
    with pytest.raises(TelemetryConfigError, match=named):
        configure_from_environment(environ, upstream_url="http://u")


def test_sampler_from_environment_drops_unsampled_roots():
    environ = {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
    }
    tracer, _ = configure_from_environment(environ, upstream_url="http://u")
    assert tracer is not None
    span = tracer.start(_scope(), RequestInfo(model="m"), 1)
    assert span is not None and not span.is_recording()
    tracer.finish(span, make_record())
    sampled_parent = [(b"traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01".encode())]
    span = tracer.start(_scope(sampled_parent), RequestInfo(model="m"), 1)
    assert span.is_recording()
    tracer.finish(span, make_record())
    tracer.shutdown()


def test_trace_id_is_exposed_for_the_record_and_log():
    provider = TracerProvider()
    tracer = GenAITracer(provider, upstream_url="http://u")
    span = tracer.start(
        _scope([(b"traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01".encode())]), RequestInfo(), 1
    )
    assert tracer.trace_id(span) == TRACE_ID
    assert tracer.trace_id(None) is None
    assert CURRENT_TRACE_ID.get() == TRACE_ID  # what the request log reads while the sinks run
    assert json.loads(json.dumps(tracer.propagation_headers(span)))[0][0] == "traceparent"
    tracer.finish(span, make_record())
    assert CURRENT_TRACE_ID.get() is None
