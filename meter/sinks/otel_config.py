"""OpenTelemetry set-up from the standard ``OTEL_*`` variables: the tracer and the meter provider.

:func:`configure_from_environment` reads the mapping the caller passes (never ``os.environ``) and
returns ``(None, None)`` when it asks for nothing, the default. ``OTEL_SDK_DISABLED``;
``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console``, ``none``; unset means
``otlp`` when an OTLP endpoint is set, else off); ``OTEL_EXPORTER_OTLP_ENDPOINT`` (+ ``/v1/traces``,
``/v1/metrics``) or the per-signal ``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``;
``OTEL_EXPORTER_OTLP_[{TRACES,METRICS}_]HEADERS`` and ``_PROTOCOL`` (only ``http/protobuf`` is
installed); ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``; ``OTEL_TRACES_SAMPLER`` / ``_ARG``;
``OTEL_BSP_*``; ``OTEL_METRIC_EXPORT_INTERVAL`` / ``_TIMEOUT``. The OTLP exporters read their
remaining options (certificates, timeout, compression) themselves.

Rule 1: a malformed value raises :class:`TelemetryConfigError` naming the variable;
        :func:`check_environment` runs the same checks at start-up without building anything.
Rule 2: this module imports the OpenTelemetry SDK, so it is imported only when an ``OTEL_*`` variable
        is set (meter.settings, meter.app); the metrics SDK and the OTLP exporters only when a signal
        asks for them.

Spans are exported through :class:`~meter.sinks.span_export.CountingBatchSpanProcessor` (fail open, drops
counted); :func:`shutdown_telemetry` drains both signals on exit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace import sampling as sampling_api
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter

from meter import __version__
from meter.errors import TelemetryConfigError
from meter.sinks.prometheus import ProxyMetrics
from meter.sinks.span_export import CountingBatchSpanProcessor
from meter.sinks.tracing import GenAITracer


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
