"""OpenTelemetry for the forward path: a span per request, off unless configured.

:class:`GenAITracer` implements :class:`meter.forward.ports.TraceHook`. Its span follows the GenAI semantic
conventions: named ``{gen_ai.operation.name} {gen_ai.request.model}`` (``chat llama-v3``), kind CLIENT
(meter calls the provider on the client's behalf), from the moment the request arrived (the proxy's
``start_time_ns``) to its last byte. It carries ``gen_ai.*`` request/response/usage attributes,
``server.address``/``server.port`` of the upstream (:mod:`meter.sinks.genai_conventions`), ``error.type``
(:func:`meter.sinks.prometheus.error_type`) and meter's own ``meter.team``, ``meter.event_id`` (the usage
record's id), ``meter.outcome`` and ``meter.usage_source``.

Rule 1: never a raw key, never prompt or completion content, never an upstream error message (it may
        quote the prompt): only ids, counts, timings, model names and request parameters.
Rule 2: W3C trace context. A client's ``traceparent``/``tracestate`` make meter's span its child; the
        upstream gets meter's span as parent (the proxy replaces the client's headers with
        :meth:`GenAITracer.propagation_headers`), so the provider's spans join the client's trace.
Rule 3: tracing never breaks forwarding: every hook method catches its own failures (logged once).
Rule 4: off by default. Without configuration the proxy gets ``tracer=None`` and calls nothing.

The tracer is built from the ``OTEL_*`` variables by :mod:`meter.sinks.otel_config`; its spans are
exported by :mod:`meter.sinks.span_export` (fail open). The GenAI metrics are
:mod:`meter.sinks.genai_metrics`.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace import TracerProvider as TracerProviderAPI
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meter import __version__
from meter.records import UsageRecord
from meter.sinks.genai_conventions import Upstream, operation_name
from meter.sinks.prometheus import error_type
from meter.sinks.requestlog import CURRENT_TRACE_ID
from meter.tap.request import RequestInfo

log = logging.getLogger("meter.sinks.tracing")

_TRACE_HEADERS = {b"traceparent": "traceparent", b"tracestate": "tracestate"}
_MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _number(value: Any) -> int | float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


class GenAITracer:
    """A :class:`meter.forward.ports.TraceHook` producing one GenAI CLIENT span per request."""

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
        self._upstream = Upstream(upstream_url)
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
