"""Prometheus metrics of the forward path, fed one UsageRecord at a time.

Rule 1: cardinality is bounded by design. No label ever carries a key, a user or a request id.
        ``team`` is a known team (the ``teams`` preset), ``unassigned`` for a record without a team, and
        ``other`` past ``max_teams``; ``model`` is a configured model (the ``models`` preset) or one of
        the first ``max_models`` distinct names of requests that succeeded, ``other`` beyond (counted
        in ``meter_label_overflow_total{label="model"}``): a name earns its label only from an upstream
        answer that succeeded, so junk names clients send cannot use up the labels of real models
        (and every name is already cut to ``meter.bounds.MODEL`` characters); ``endpoint`` is a known
        OpenAI path or ``other``;
        ``error_type`` is an HTTP status code or one of a few fixed words (:func:`error_type`).
Rule 2: metrics take a ``registry=``; tests build a fresh one.
Rule 3: a counter whose label values are known in advance (usage source, observe-error kind, telemetry
        drops, in-flight endpoint) is created at zero, so "none happened" is a 0, not an absent series.
Rule 4: quota and budget metrics belong to the quota module, on the same registry; the dashboards
        and alert rules expect ``meter_quota_rejections_total{team, reason}``,
        ``meter_team_budget_usd{team, period}`` and ``meter_team_spend_usd{team, period}``, with
        ``team`` from :meth:`ProxyMetrics.team_label`.
Rule 5: Prometheus samples are float64. Cost is observed as ``float(record.cost_usd)``: monitoring,
        never billing (the database keeps the exact Decimal).

Processes: the supported model is **one process per replica**, scraped one by one (``--workers 1``, the
default; scale with replicas). With ``--workers N`` every worker records into prometheus-client's
multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, which ``meter serve`` points at a fresh directory
before the workers start), and ``/metrics`` aggregates them through :func:`exposition_registry`:
counters and histograms are summed over workers, ``meter_inflight_requests`` is the live sum. Gauges
read through ``Gauge.set_function`` are not visible in that mode (their value never reaches the files);
gauges that must work with several workers are set with ``.set()`` and a ``multiprocess_mode``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, values
from prometheus_client.multiprocess import MultiProcessCollector

from meter import __version__
from meter.records import Outcome, UsageRecord, UsageSource
from meter.serving.limits import REFUSAL_REASONS

KNOWN_ENDPOINTS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/models",
        "/v1/rerank",
        "/v1/audio/transcriptions",
        "/v1/images/generations",
    }
)
OTHER = "other"
UNASSIGNED = "unassigned"
OBSERVE_ERROR_KINDS = (
    "json",
    "encoding",
    "internal",
    "body_too_large",
    "decode_budget",
)  # meter.tap.observer
TELEMETRY_DROPS = (("spans", "queue_full"), ("spans", "export_failed"), ("logs", "queue_full"))
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client itself, at import

# First token arrives within 5 ms (cache hit on a small model) to 30 s (queued large model).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Whole requests: a cached embedding in milliseconds to a 10-minute reasoning stream.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# meter's own cost per request: 100 µs is the target scale, 3 ms the p99 budget (alert rule).
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1)
# Decode speed: 1 ms/token (1000 tok/s, speculative decoding) to 1 s/token (overloaded).
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)

# Status codes of meter's own errors (meter.errors), named for the error_type label.
_PROXY_ERROR_TYPES = {
    400: "invalid_request",
    408: "request_timeout",
    413: "request_too_large",
    500: "internal_error",
    502: "upstream_failed",
    504: "upstream_timeout",
}


def error_type(record: UsageRecord) -> str | None:
    """The record's error in a bounded vocabulary, shared by metrics and spans (OpenTelemetry's
    ``error.type``): None when the request succeeded; ``aborted`` (the client left); the upstream's
    status code (``"429"``, ``"503"``); ``stream_error`` (an error event inside a 2xx stream); or
    meter's own: ``invalid_request`` (a target, credential or header meter refuses),
    ``request_timeout``, ``request_too_large``, ``internal_error``, ``upstream_failed``,
    ``upstream_timeout``, ``proxy_error``,
    ``quota_rejected`` (429 from a limit), ``quota_unavailable`` (503: the quota store is down)."""
    outcome = record.outcome
    if outcome is Outcome.OK:
        return None
    if outcome is Outcome.ABORTED:
        return "aborted"
    if outcome is Outcome.PROXY_ERROR:
        return _PROXY_ERROR_TYPES.get(record.status_code, "proxy_error")
    if outcome is Outcome.REJECTED:
        return "quota_rejected" if record.status_code == 429 else "quota_unavailable"
    return str(record.status_code) if record.status_code >= 400 else "stream_error"


class LabelBudget:
    """Maps arbitrary values onto at most ``cap`` distinct label values (plus the ``preset`` ones) and
    ``other``. The first ``cap`` values admitted keep their name for the life of the process; a value
    looked up with ``admit=False`` gets its name only if it was admitted before."""

    def __init__(self, cap: int, preset: Iterable[str] = ()) -> None:
        self._cap = cap
        self._preset = frozenset(preset)
        self._seen: set[str] = set()

    def __call__(self, value: str | None, *, admit: bool = True) -> str:
        if not value:
            return OTHER
        if value in self._seen or value in self._preset:
            return value
        if admit and len(self._seen) < self._cap:
            self._seen.add(value)
            return value
        return OTHER


class ProxyMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_models: int = 100,
        models: Iterable[str] = (),
        max_teams: int = 1000,
        teams: Iterable[str] = (),
        process_metrics: bool = True,
    ) -> None:
        self.model_label = LabelBudget(max_models, models)
        self._team_budget = LabelBudget(max_teams, teams)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "meter_requests",
            "Requests forwarded, by team, requested model, endpoint and the status meter returned.",
            ["team", "model", "endpoint", "status_code"],
            registry=registry,
        )
        self.errors = Counter(
            "meter_request_errors",
            "Requests that did not succeed, by error type (upstream status code, stream_error, aborted, "
            "or meter's own: invalid_request, request_timeout, request_too_large, internal_error, "
            "upstream_failed, upstream_timeout, proxy_error, quota_rejected, quota_unavailable).",
            ["team", "model", "error_type"],
            registry=registry,
        )
        self.tokens = Counter(
            "meter_tokens",
            "Tokens used, by type (prompt, completion, cached_prompt, reasoning).",
            ["team", "model", "type"],
            registry=registry,
        )
        self.cost = Counter(
            "meter_cost_usd",
            "Cost of the usage in US dollars, from the price table (monitoring only; billing reads the "
            "database).",
            ["team", "model"],
            registry=registry,
        )
        self.unpriced = Counter(
            "meter_unpriced_requests",
            "Requests with token usage but no price (the model is missing from the price table).",
            ["team", "model"],
            registry=registry,
        )
        self.duration = Histogram(
            "meter_request_duration_seconds",
            "Request duration observed by meter, arrival to last byte relayed.",
            ["team", "model", "endpoint", "stream"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "meter_time_to_first_token_seconds",
            "Time to the first streamed content chunk, observed by meter (streams only).",
            ["team", "model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "meter_time_per_output_token_seconds",
            "Time per output token after the first, observed by meter (streams only).",
            ["team", "model"],
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        self.upstream_ttft = Histogram(
            "meter_upstream_time_to_first_token_seconds",
            "Time to first token reported by the upstream (fireworks-server-time-to-first-token).",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.upstream_processing = Histogram(
            "meter_upstream_processing_seconds",
            "Processing time reported by the upstream (fireworks-server-processing-time).",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "meter_overhead_seconds",
            "Time meter itself added to a request (before forwarding + relaying the response head).",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.usage_source = Counter(
            "meter_usage_source",
            "Records by where their token counts came from (reported, estimated, missing).",
            ["source"],
            registry=registry,
        )
        self.observe_errors = Counter(
            "meter_observe_errors",
            "Response data meter could not parse (skipped; the client's bytes are unaffected).",
            ["kind"],
            registry=registry,
        )
        self.inflight = Gauge(
            "meter_inflight_requests",
            "Requests being forwarded right now.",
            ["endpoint"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.label_overflow = Counter(
            "meter_label_overflow",
            "Records whose label value was folded into 'other' because the label's cap was reached.",
            ["label"],
            registry=registry,
        )
        self.connection_refusals = Counter(
            "meter_connection_refusals",
            "Client connections meter's HTTP server refused or cut before a request existed (no usage "
            "record is possible): too_many_connections, head_too_large, head_timeout, malformed, "
            "send_timeout.",
            ["reason"],
            registry=registry,
        )
        self.telemetry_drops = Counter(
            "meter_telemetry_dropped",
            "Telemetry items dropped (spans, log lines): a full queue or a failed export. Usage records "
            "are never dropped; they go to the journal.",
            ["signal", "reason"],
            registry=registry,
        )
        build = Gauge(
            "meter_build_info",
            "meter's version (always 1).",
            ["version"],
            multiprocess_mode="max",
            registry=registry,
        )
        build.labels(__version__).set(1)
        for source in UsageSource:
            self.usage_source.labels(source.value)
        for kind in OBSERVE_ERROR_KINDS:
            self.observe_errors.labels(kind)
        for signal, reason in TELEMETRY_DROPS:
            self.telemetry_drops.labels(signal, reason)
        for reason in REFUSAL_REASONS:
            self.connection_refusals.labels(reason)
        for path in KNOWN_ENDPOINTS:
            self.inflight.labels(path)
        self.label_overflow.labels("model")
        self.label_overflow.labels("team")
        if process_metrics:
            ProcessCollector(registry=registry)

    def endpoint_label(self, path: str) -> str:
        return path if path in KNOWN_ENDPOINTS else OTHER

    def team_label(self, team: str | None) -> str:
        if not team:
            return UNASSIGNED
        label = self._team_budget(team)
        if label == OTHER and team != OTHER:
            self.label_overflow.labels("team").inc()
        return label

    def connection_refused(self, reason: str) -> None:
        self.connection_refusals.labels(reason).inc()

    def observe_error(self, kind: str) -> None:
        self.observe_errors.labels(kind).inc()

    def telemetry_dropped(self, signal: str, reason: str, count: int = 1) -> None:
        self.telemetry_drops.labels(signal, reason).inc(count)

    def _child(self, metric: Any, *values: str) -> Any:
        # labels() validates and locks on every call (~2 µs); label sets are bounded, so memoise them.
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def publish(self, record: UsageRecord) -> None:
        team = self.team_label(record.team)
        raw_model = record.requested_model or record.response_model
        failure = error_type(record)
        model = self.model_label(raw_model, admit=failure is None)
        if model == OTHER and raw_model and raw_model != OTHER and failure is None:
            self._child(self.label_overflow, "model").inc()
        endpoint = self.endpoint_label(record.endpoint)
        self._child(self.requests, team, model, endpoint, str(record.status_code)).inc()
        if failure is not None:
            self._child(self.errors, team, model, failure).inc()
        self._child(self.usage_source, record.usage_source.value).inc()
        for kind, count in (
            ("prompt", record.prompt_tokens),
            ("completion", record.completion_tokens),
            ("cached_prompt", record.cached_tokens),
            ("reasoning", record.reasoning_tokens),
        ):
            if count:
                self._child(self.tokens, team, model, kind).inc(count)
        self._count_cost(record, team, model)
        if record.duration_ms is not None:
            self._child(self.duration, team, model, endpoint, "true" if record.stream else "false").observe(
                record.duration_ms / 1000.0
            )
        if record.ttft_ms is not None:
            self._child(self.ttft, team, model).observe(record.ttft_ms / 1000.0)
            per_token = time_per_output_token(record)
            if per_token is not None:
                self._child(self.tpot, team, model).observe(per_token)
        if record.server_ttft_ms is not None:
            self._child(self.upstream_ttft, model).observe(record.server_ttft_ms / 1000.0)
        if record.server_processing_ms is not None:
            self._child(self.upstream_processing, model).observe(record.server_processing_ms / 1000.0)
        if record.overhead_ms is not None:
            self.overhead.observe(record.overhead_ms / 1000.0)

    def _count_cost(self, record: UsageRecord, team: str, model: str) -> None:
        cost = record.cost_usd
        if cost is None:  # on a record that used tokens: nothing priced it
            if record.prompt_tokens or record.completion_tokens or record.total_tokens:
                self._child(self.unpriced, team, model).inc()
            return
        if cost > 0:
            self._child(self.cost, team, model).inc(float(cost))


def time_per_output_token(record: UsageRecord) -> float | None:
    """Seconds per output token after the first, for a stream (None when it cannot be told)."""
    tokens = record.completion_tokens
    if record.ttft_ms is None or record.duration_ms is None or not tokens or tokens < 2:
        return None
    return max((record.duration_ms - record.ttft_ms) / 1000.0 / (tokens - 1), 0.0)


def prepare_multiprocess_dir(path: str | None = None) -> str:
    """A directory for prometheus-client's multiprocess files: ``path`` emptied of stale ``*.db`` files
    (a previous run's counters must not be added to this one's), or a fresh temporary directory."""
    if path is None:
        return tempfile.mkdtemp(prefix="meter-metrics-")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return str(directory)


def activate_multiprocess() -> None:
    """Make metrics created from now on record into the multiprocess files. prometheus-client decides
    at import time, from ``PROMETHEUS_MULTIPROC_DIR``; call this after setting the variable in a
    process that may already have imported it (``meter serve`` with one worker serves in-process)."""
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def remove_multiprocess_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def exposition_registry(registry: CollectorRegistry, multiprocess_dir: str | None) -> CollectorRegistry:
    """The registry ``/metrics`` encodes: the process's own, or with several workers one that sums every
    worker's multiprocess files."""
    if multiprocess_dir is None:
        return registry
    combined = CollectorRegistry()
    MultiProcessCollector(combined, path=multiprocess_dir)  # type: ignore[no-untyped-call]
    return combined
