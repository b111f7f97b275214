"""OpenTelemetry for the forward path: a span per request and the GenAI metrics, off unless configured.

:class:`GenAITracer` implements :class:`meter.proxy.TraceHook`. Its span follows the GenAI semantic
conventions: named ``{gen_ai.operation.name} {gen_ai.request.model}`` (``chat llama-v3``), kind CLIENT
(meter calls the provider on the client's behalf), from the moment the request arrived (the proxy's
``start_time_ns``) to its last byte. It carries ``gen_ai.*`` request/response/usage attributes,
``server.address``/``server.port`` of the upstream, ``error.type`` (:func:`meter.metrics.error_type`)
and meter's own ``meter.team``, ``meter.event_id`` (the usage record's id), ``meter.outcome`` and
``meter.usage_source``.

Rule 1: never a raw key, never prompt or completion content, never an upstream error message (it may
        quote the prompt): only ids, counts, timings, model names and request parameters.
Rule 2: W3C trace context. A client's ``traceparent``/``tracestate`` make meter's span its child; the
        upstream gets meter's span as parent (the proxy replaces the client's headers with
        :meth:`GenAITracer.propagation_headers`), so the provider's spans join the client's trace.
Rule 3: tracing never breaks forwarding: every hook method catches its own failures (logged once).
Rule 4: off by default. Without configuration the proxy gets ``tracer=None`` and calls nothing.

``gen_ai.provider.name`` is ``fireworks`` when the upstream host is ``fireworks.ai`` or a subdomain of
it, else ``openai``: meter speaks the OpenAI API, so any other upstream is treated as OpenAI-compatible.

GenAI metrics (:class:`GenAIMetrics`, a usage sink): ``gen_ai.client.token.usage`` and
``gen_ai.client.operation.duration`` describe meter's call to the upstream. meter is the GenAI server
its clients talk to, so ``gen_ai.server.time_to_first_token`` and ``gen_ai.server.time_per_output_token``
are measured at meter's edge (streams only: only a stream shows a first token). What the upstream
reports about itself stays in Prometheus (``meter_upstream_*``). Model attributes share the Prometheus
metrics' :class:`~meter.metrics.LabelBudget`, so a client sending random model names cannot grow them.

Configuration (:func:`configure_from_environment`): the standard variables, read from the mapping the
caller passes. ``OTEL_SDK_DISABLED``; ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` (``otlp``,
``console``, ``none``; unset means ``otlp`` when an OTLP endpoint is set, else off);
``OTEL_EXPORTER_OTLP_ENDPOINT`` (+ ``/v1/traces``, ``/v1/metrics``) or the per-signal
``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``; ``OTEL_EXPORTER_OTLP_[{TRACES,METRICS}_]HEADERS`` and
``_PROTOCOL`` (only ``http/protobuf`` is installed); ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``;
``OTEL_TRACES_SAMPLER`` / ``_ARG``; ``OTEL_BSP_*``; ``OTEL_METRIC_EXPORT_INTERVAL`` / ``_TIMEOUT``. The
OTLP exporters read their remaining options (certificates, timeout, compression) themselves. A
malformed value raises :class:`TelemetryConfigError` naming the variable.

Failure policy (OTLP collector): fail open. Spans wait in a bounded queue (``OTEL_BSP_MAX_QUEUE_SIZE``)
exported in batches by a background thread; a full queue or a failed export drops spans and counts them
in ``meter_telemetry_dropped_total{signal="spans", reason}``. Requests never wait for the collector.
:meth:`GenAITracer.shutdown` drains the queue on exit.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from opentelemetry.context import Context
from opentelemetry.metrics import MeterProvider
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import sampling as sampling_api
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace import TracerProvider as TracerProviderAPI
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meter import __version__
from meter.metrics import LabelBudget, ProxyMetrics, error_type, time_per_output_token
from meter.records import UsageRecord
from meter.request_info import RequestInfo
from meter.requestlog import CURRENT_TRACE_ID

log = logging.getLogger("meter.tracing")

OnDrop = Callable[[str, str, int], None]  # (signal, reason, count)

# The OpenAI paths meter knows, as GenAI operations.
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}
# Advisory buckets from the GenAI semantic conventions.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

_TRACE_HEADERS = {b"traceparent": "traceparent", b"tracestate": "tracestate"}
_MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class TelemetryConfigError(ValueError):
    """An ``OTEL_*`` variable is malformed or asks for something meter does not ship; names it."""


def operation_name(path: str) -> str | None:
    return OPERATIONS.get(path)


def provider_name(host: str | None) -> str:
    host = (host or "").lower().rstrip(".")
    return "fireworks" if host == "fireworks.ai" or host.endswith(".fireworks.ai") else "openai"


def _number(value: Any) -> int | float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


class _Upstream:
    """What every span and metric says about the upstream."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self.address = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.provider = provider_name(parts.hostname)


class GenAITracer:
    """A :class:`meter.proxy.TraceHook` producing one GenAI CLIENT span per request."""

    def __init__(
        self,
        tracer_provider: TracerProviderAPI,
        *,
        upstream_url: str,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._provider = tracer_provider
        self._tracer = tracer_provider.get_tracer("meter", __version__)
        self._propagator = propagator if propagator is not None else TraceContextTextMapPropagator()
        self._upstream = _Upstream(upstream_url)
        self._failed = False

    # --- TraceHook ------------------------------------------------------------------------------

    def start(self, scope: dict[str, Any], info: RequestInfo, start_time_ns: int) -> Span | None:
        try:
            return self._start(scope, info, start_time_ns)
        except Exception:
            self._log_failure("start")
            return None

    def propagation_headers(self, span: Span | None) -> list[tuple[str, str]]:
        if span is None:
            return []
        try:
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier, context=set_span_in_context(span, Context()))
            return list(carrier.items())
        except Exception:
            self._log_failure("propagation_headers")
            return []

    def finish(self, span: Span | None, record: UsageRecord) -> None:
        if span is None:
            return
        try:
            if span.is_recording():
                self._finish(span, record)
        except Exception:
            self._log_failure("finish")
        finally:
            span.end()
            CURRENT_TRACE_ID.set(None)  # the request's sinks (the request log) have run by now

    # --- the rest -------------------------------------------------------------------------------

    @staticmethod
    def trace_id(span: Span | None) -> str | None:
        """The span's trace id as 32 hex digits (for the usage record and the request log)."""
        if span is None:
            return None
        context = span.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None

    def shutdown(self) -> None:
        """Export every queued span (bounded by the processor's timeout), then stop."""
        shutdown = getattr(self._provider, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def _start(self, scope: dict[str, Any], info: RequestInfo, start_time_ns: int) -> Span:
        carrier: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = _TRACE_HEADERS.get(name)
            if key is not None:
                carrier[key] = value.decode("latin-1")
        parent = self._propagator.extract(carrier, context=Context()) if carrier else Context()
        upstream = self._upstream
        operation = operation_name(scope["path"])
        model = info.model
        attributes: dict[str, Any] = {
            "gen_ai.provider.name": upstream.provider,
            "gen_ai.request.stream": info.stream,
            "server.address": upstream.address,
            "server.port": upstream.port,
            "http.request.method": scope["method"],
        }
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
            name = f"{operation} {model}" if model else operation
        else:
            name = scope["method"]  # not a GenAI call (e.g. GET /v1/models): the HTTP span name
        if model:
            attributes["gen_ai.request.model"] = model
        body = info.json
        if body is not None:
            for field in _MAX_TOKENS_FIELDS:
                value = _number(body.get(field))
                if value is not None:
                    attributes["gen_ai.request.max_tokens"] = value
                    break
            for field, attribute in (
                ("temperature", "gen_ai.request.temperature"),
                ("top_p", "gen_ai.request.top_p"),
                ("seed", "gen_ai.request.seed"),
            ):
                value = _number(body.get(field))
                if value is not None:
                    attributes[attribute] = value
            choices = _number(body.get("n"))
            if choices is not None and choices != 1:
                attributes["gen_ai.request.choice.count"] = choices
        span = self._tracer.start_span(
            name, context=parent, kind=SpanKind.CLIENT, attributes=attributes, start_time=start_time_ns
        )
        context = span.get_span_context()
        if context.is_valid:
            CURRENT_TRACE_ID.set(format(context.trace_id, "032x"))
        return span

    def _finish(self, span: Span, record: UsageRecord) -> None:
        attributes: dict[str, Any] = {
            "http.response.status_code": record.status_code,
            "meter.team": record.team or "unassigned",
            "meter.event_id": record.event_id,
            "meter.outcome": record.outcome.value,
            "meter.usage_source": record.usage_source.value,
        }
        for attribute, value in (
            ("gen_ai.response.model", record.response_model),
            ("gen_ai.response.id", record.response_id),
            ("gen_ai.usage.input_tokens", record.prompt_tokens),
            ("gen_ai.usage.output_tokens", record.completion_tokens),
            ("gen_ai.usage.cache_read.input_tokens", record.cached_tokens),
            ("gen_ai.usage.reasoning.output_tokens", record.reasoning_tokens),
            ("meter.overhead_ms", record.overhead_ms),
        ):
            if value is not None:
                attributes[attribute] = value
        if record.finish_reason:
            attributes["gen_ai.response.finish_reasons"] = tuple(record.finish_reason.split(","))
        if record.ttft_ms is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = record.ttft_ms / 1000.0
        failure = error_type(record)
        if failure is not None:
            attributes["error.type"] = failure
        span.set_attributes(attributes)
        if failure is not None:
            span.set_status(Status(StatusCode.ERROR, failure))

    def _log_failure(self, where: str) -> None:
        if not self._failed:  # once: a broken tracer must not flood the log at the request rate
            self._failed = True
            log.exception("tracing failed in %s; the request goes on untraced", where)


class GenAIMetrics:
    """A usage sink recording the GenAI semantic-convention metrics through an OpenTelemetry meter."""

    def __init__(
        self,
        meter_provider: MeterProvider,
        *,
        upstream_url: str,
        model_label: Callable[[str | None], str] | None = None,
        team_label: Callable[[str | None], str] | None = None,
    ) -> None:
        meter = meter_provider.get_meter("meter", __version__)
        self._upstream = _Upstream(upstream_url)
        self._model = model_label if model_label is not None else LabelBudget(100)
        self._team = team_label if team_label is not None else (lambda team: team or "unassigned")
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time to the first token relayed to the client (streams).",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self._tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="Time per output token after the first (streams).",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS,
        )

    def __call__(self, record: UsageRecord) -> None:
        operation = operation_name(record.endpoint)
        if operation is None:
            return
        upstream = self._upstream
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": upstream.provider,
            "gen_ai.request.model": self._model(record.requested_model),
            "server.address": upstream.address,
            "server.port": upstream.port,
            "meter.team": self._team(record.team),
        }
        if record.response_model:
            attributes["gen_ai.response.model"] = self._model(record.response_model)
        failure = error_type(record)
        if record.duration_ms is not None:
            timed = attributes if failure is None else {**attributes, "error.type": failure}
            self._duration.record(record.duration_ms / 1000.0, timed)
        if record.prompt_tokens is not None:
            self._tokens.record(record.prompt_tokens, {**attributes, "gen_ai.token.type": "input"})
        if record.completion_tokens is not None:
            self._tokens.record(record.completion_tokens, {**attributes, "gen_ai.token.type": "output"})
        if record.ttft_ms is not None:
            self._ttft.record(record.ttft_ms / 1000.0, attributes)
            per_token = time_per_output_token(record)
            if per_token is not None:
                self._tpot.record(per_token, attributes)


# --- configuration from OTEL_* variables ----------------------------------------------------------


class _CountingExporter(SpanExporter):
    """Counts the spans of every failed export (the batch is lost: fail open)."""

    def __init__(self, inner: SpanExporter, on_drop: OnDrop | None) -> None:
        self._inner = inner
        self._on_drop = on_drop

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:
            log.warning("span export failed", exc_info=True)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS and self._on_drop is not None:
            self._on_drop("spans", "export_failed", len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """A BatchSpanProcessor that counts the spans it drops because its queue is full."""

    def __init__(self, exporter: SpanExporter, *, on_drop: OnDrop | None = None, **options: Any) -> None:
        super().__init__(_CountingExporter(exporter, on_drop), **options)
        self._on_drop = on_drop
        # The SDK drops the oldest span when a new one meets a full queue; it only logs that. Its
        # queue is private, so the count degrades to nothing (never to an error) if the SDK changes.
        batch = getattr(self, "_batch_processor", None)
        self._queue = getattr(batch, "_queue", None)
        self._max_queue = getattr(batch, "_max_queue_size", None)

    def on_end(self, span: ReadableSpan) -> None:
        queue, on_drop = self._queue, self._on_drop
        if (
            on_drop is not None
            and queue is not None
            and span.context is not None
            and span.context.trace_flags.sampled
            and len(queue) >= (self._max_queue or 0)
        ):
            on_drop("spans", "queue_full", 1)
        super().on_end(span)


def _flag(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in {"", "false"}:
        return False
    if value == "true":
        return True
    raise TelemetryConfigError(f"invalid {name}={environ[name]!r}: expected true or false")


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise TelemetryConfigError(f"invalid {name}={raw!r}: expected a positive integer") from None
    if value <= 0:
        raise TelemetryConfigError(f"invalid {name}={raw!r}: expected a positive integer")
    return value


def _pairs(environ: Mapping[str, str], name: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` with percent-encoded values (the OTEL headers and resource attribute format)."""
    result: dict[str, str] = {}
    for item in environ.get(name, "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TelemetryConfigError(f"invalid {name}: {item.strip()!r} is not key=value")
        result[unquote(key.strip())] = unquote(value.strip())
    return result


def _exporters(environ: Mapping[str, str], signal: str) -> list[str]:
    """The exporters asked for one signal (``traces`` or ``metrics``), ``[]`` when off."""
    variable = f"OTEL_{signal.upper()}_EXPORTER"
    raw = environ.get(variable, "").strip().lower()
    if not raw:
        endpoint_set = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
            f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"
        )
        return ["otlp"] if endpoint_set else []
    names = [name.strip() for name in raw.split(",") if name.strip()]
    for name in names:
        if name not in {"otlp", "console", "none"}:
            raise TelemetryConfigError(f"invalid {variable}={raw!r}: meter supports otlp, console or none")
    return [] if "none" in names else names


def _otlp_options(environ: Mapping[str, str], signal: str) -> dict[str, Any]:
    upper = signal.upper()
    for variable in (f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(variable, "").strip()
        if protocol:
            if protocol != "http/protobuf":
                raise TelemetryConfigError(
                    f"invalid {variable}={protocol!r}: meter ships the http/protobuf OTLP exporter only"
                )
            break
    endpoint = environ.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT", "").strip()
    if not endpoint:
        base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
        endpoint = f"{base.rstrip('/')}/v1/{signal}"
    if urlsplit(endpoint).scheme not in {"http", "https"}:
        raise TelemetryConfigError(f"invalid OTLP {signal} endpoint {endpoint!r}: expected an http(s) URL")
    headers = _pairs(environ, "OTEL_EXPORTER_OTLP_HEADERS")
    headers.update(_pairs(environ, f"OTEL_EXPORTER_OTLP_{upper}_HEADERS"))
    return {"endpoint": endpoint, "headers": headers or None}


def _sampler(environ: Mapping[str, str]) -> sampling_api.Sampler:
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    raw_arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    ratio = 1.0
    if name.endswith("traceidratio") and raw_arg:
        try:
            ratio = float(raw_arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TelemetryConfigError(f"invalid OTEL_TRACES_SAMPLER_ARG={raw_arg!r}: expected 0..1")
    samplers: dict[str, Callable[[], sampling_api.Sampler]] = {
        "always_on": lambda: sampling_api.ALWAYS_ON,
        "always_off": lambda: sampling_api.ALWAYS_OFF,
        "traceidratio": lambda: sampling_api.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling_api.ParentBased(sampling_api.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling_api.ParentBased(sampling_api.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling_api.ParentBased(sampling_api.TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise TelemetryConfigError(
            f"invalid OTEL_TRACES_SAMPLER={name!r}: expected one of {', '.join(samplers)}"
        )
    return samplers[name]()


def resource_from_environment(environ: Mapping[str, str]) -> Resource:
    attributes: dict[str, Any] = {"service.name": "meter", "service.version": __version__}
    attributes.update(_pairs(environ, "OTEL_RESOURCE_ATTRIBUTES"))
    service = environ.get("OTEL_SERVICE_NAME", "").strip()
    if service:
        attributes["service.name"] = service
    return Resource.create(attributes)


def shutdown_telemetry(tracer: GenAITracer | None, meter_provider: MeterProvider | None) -> None:
    """Drain and stop both (blocking: run it in a thread from async code)."""
    if tracer is not None:
        tracer.shutdown()
    shutdown = getattr(meter_provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def check_environment(environ: Mapping[str, str]) -> None:
    """Validate the ``OTEL_*`` variables meter reads without building anything (for start-up, so a
    typo fails at once); raises :class:`TelemetryConfigError` naming the variable."""
    if _flag(environ, "OTEL_SDK_DISABLED"):
        return
    _pairs(environ, "OTEL_RESOURCE_ATTRIBUTES")
    for signal in ("traces", "metrics"):
        if "otlp" in _exporters(environ, signal):
            _otlp_options(environ, signal)
    _sampler(environ)
    for name in (
        "OTEL_BSP_MAX_QUEUE_SIZE",
        "OTEL_BSP_SCHEDULE_DELAY",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        "OTEL_BSP_EXPORT_TIMEOUT",
        "OTEL_METRIC_EXPORT_INTERVAL",
        "OTEL_METRIC_EXPORT_TIMEOUT",
    ):
        _int(environ, name, 1)


def configure_from_environment(
    environ: Mapping[str, str],
    *,
    upstream_url: str,
    metrics: ProxyMetrics | None = None,
) -> tuple[GenAITracer | None, MeterProvider | None]:
    """The tracing hook and the OpenTelemetry meter provider the ``OTEL_*`` variables ask for
    (``(None, None)`` when they ask for nothing, the default). ``metrics``: count dropped spans there."""
    if _flag(environ, "OTEL_SDK_DISABLED"):
        return None, None
    resource = resource_from_environment(environ)
    on_drop = metrics.telemetry_dropped if metrics is not None else None
    tracer: GenAITracer | None = None
    trace_exporters = _exporters(environ, "traces")
    if trace_exporters:
        provider = TracerProvider(resource=resource, sampler=_sampler(environ))
        for name in trace_exporters:
            exporter: SpanExporter
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter(**_otlp_options(environ, "traces"))
            else:
                exporter = ConsoleSpanExporter(out=sys.stderr)
            provider.add_span_processor(
                CountingBatchSpanProcessor(
                    exporter,
                    on_drop=on_drop,
                    max_queue_size=_int(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048),
                    schedule_delay_millis=_int(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000),
                    max_export_batch_size=_int(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
                    export_timeout_millis=_int(environ, "OTEL_BSP_EXPORT_TIMEOUT", 30000),
                )
            )
        tracer = GenAITracer(provider, upstream_url=upstream_url)
    meter_provider: MeterProvider | None = None
    metric_exporters = _exporters(environ, "metrics")
    if metric_exporters:
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            MetricExporter,
            PeriodicExportingMetricReader,
        )

        readers = []
        for name in metric_exporters:
            metric_exporter: MetricExporter
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

                metric_exporter = OTLPMetricExporter(**_otlp_options(environ, "metrics"))
            else:
                metric_exporter = ConsoleMetricExporter(out=sys.stderr)
            readers.append(
                PeriodicExportingMetricReader(
                    metric_exporter,
                    export_interval_millis=_int(environ, "OTEL_METRIC_EXPORT_INTERVAL", 60000),
                    export_timeout_millis=_int(environ, "OTEL_METRIC_EXPORT_TIMEOUT", 30000),
                )
            )
        meter_provider = SdkMeterProvider(metric_readers=readers, resource=resource)
    return tracer, meter_provider
