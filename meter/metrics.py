"""Prometheus metrics of the forward path, fed one UsageRecord at a time.

Rule 1: cardinality is bounded by design. No label ever carries a key, a user or a request id. The
        ``model`` label takes the first ``max_models`` distinct model names seen (plus any configured
        ones) and ``other`` beyond; ``endpoint`` is one of the known OpenAI paths or ``other``; ``team``
        is the record's team or ``unassigned``.
Rule 2: metrics take a ``registry=``; tests build a fresh one.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meter.records import UsageRecord

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

# First token arrives within 5 ms (cache hit on a small model) to 30 s (queued large model).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Whole requests: a cached embedding in milliseconds to a 10-minute reasoning stream.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# meter's own cost per request: 100 µs is the target scale, 3 ms the p99 budget.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)


class LabelBudget:
    """Maps arbitrary values onto at most ``cap`` distinct label values plus ``other``."""

    def __init__(self, cap: int, preset: Iterable[str] = ()) -> None:
        self._cap = cap
        self._seen: set[str] = set(preset)

    def __call__(self, value: str | None) -> str:
        if not value:
            return OTHER
        if value in self._seen:
            return value
        if len(self._seen) < self._cap:
            self._seen.add(value)
            return value
        return OTHER


class ProxyMetrics:
    def __init__(
        self, registry: CollectorRegistry, *, max_models: int = 100, models: Iterable[str] = ()
    ) -> None:
        self.model_label = LabelBudget(max_models, models)
        self.requests = Counter(
            "meter_requests",
            "Requests forwarded, by team, requested model, endpoint and the status meter returned.",
            ["team", "model", "endpoint", "status_code"],
            registry=registry,
        )
        self.tokens = Counter(
            "meter_tokens",
            "Tokens used, by type (prompt, completion, cached_prompt, reasoning).",
            ["team", "model", "type"],
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
            "Response chunks meter could not parse (skipped; the client's bytes are unaffected).",
            ["kind"],
            registry=registry,
        )
        self.inflight = Gauge(
            "meter_inflight_requests", "Requests being forwarded right now.", ["endpoint"], registry=registry
        )

    def endpoint_label(self, path: str) -> str:
        return path if path in KNOWN_ENDPOINTS else OTHER

    def observe_error(self, kind: str) -> None:
        self.observe_errors.labels(kind).inc()

    def observe(self, record: UsageRecord) -> None:
        team = record.team or UNASSIGNED
        model = self.model_label(record.requested_model or record.response_model)
        endpoint = self.endpoint_label(record.endpoint)
        self.requests.labels(team, model, endpoint, str(record.status_code)).inc()
        self.usage_source.labels(record.usage_source.value).inc()
        for kind, count in (
            ("prompt", record.prompt_tokens),
            ("completion", record.completion_tokens),
            ("cached_prompt", record.cached_tokens),
            ("reasoning", record.reasoning_tokens),
        ):
            if count:
                self.tokens.labels(team, model, kind).inc(count)
        if record.duration_ms is not None:
            self.duration.labels(team, model, endpoint, "true" if record.stream else "false").observe(
                record.duration_ms / 1000.0
            )
        if record.ttft_ms is not None:
            self.ttft.labels(team, model).observe(record.ttft_ms / 1000.0)
            if record.completion_tokens and record.completion_tokens > 1 and record.duration_ms is not None:
                per_token = (record.duration_ms - record.ttft_ms) / 1000.0 / (record.completion_tokens - 1)
                self.tpot.labels(team, model).observe(max(per_token, 0.0))
        if record.server_ttft_ms is not None:
            self.upstream_ttft.labels(model).observe(record.server_ttft_ms / 1000.0)
        if record.server_processing_ms is not None:
            self.upstream_processing.labels(model).observe(record.server_processing_ms / 1000.0)
        if record.overhead_ms is not None:
            self.overhead.observe(record.overhead_ms / 1000.0)
