"""The GenAI semantic-convention metrics through an OpenTelemetry meter, off unless configured.

:class:`GenAIMetrics` is a usage sink. ``gen_ai.client.token.usage`` and
``gen_ai.client.operation.duration`` describe meter's call to the upstream. meter is the GenAI server
its clients talk to, so ``gen_ai.server.time_to_first_token`` and ``gen_ai.server.time_per_output_token``
are measured at meter's edge (streams only: only a stream shows a first token). What the upstream
reports about itself stays in Prometheus (``meter_upstream_*``).

Rule 1: bounded attributes. Model attributes share the Prometheus metrics'
        :class:`~meter.sinks.prometheus.LabelBudget`, so a client sending random model names cannot grow them;
        the rest are the operation, the upstream (:mod:`meter.sinks.genai_conventions`), the team and
        ``error.type``.
Rule 2: only GenAI operations are recorded (:func:`~meter.sinks.genai_conventions.operation_name`); a
        request to any other path records nothing.

The meter provider is built from the ``OTEL_*`` variables by :mod:`meter.sinks.otel_config`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.metrics import MeterProvider

from meter import __version__
from meter.records import UsageRecord
from meter.sinks.genai_conventions import Upstream, operation_name
from meter.sinks.prometheus import LabelBudget, error_type, time_per_output_token

# Advisory buckets from the GenAI semantic conventions.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class GenAIMetrics:
    """A usage sink recording the GenAI semantic-convention metrics through an OpenTelemetry meter."""

    def __init__(
        self,
        meter_provider: MeterProvider,
        *,
        upstream_url: str,
        model_label: LabelBudget | None = None,
        team_label: Callable[[str | None], str] | None = None,
    ) -> None:
        meter = meter_provider.get_meter("meter", __version__)
        self._upstream = Upstream(upstream_url)
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
        failure = error_type(record)
        succeeded = failure is None  # a model name earns its own value only then (meter.sinks.prometheus)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": upstream.provider,
            "gen_ai.request.model": self._model(record.requested_model, admit=succeeded),
            "server.address": upstream.address,
            "server.port": upstream.port,
            "meter.team": self._team(record.team),
        }
        if record.response_model:
            attributes["gen_ai.response.model"] = self._model(record.response_model, admit=succeeded)
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
