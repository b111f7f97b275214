"""The ports the forward path calls out through (STYLE rule 10: ports as ``typing.Protocol``), and the
one rule that joins a finished request to its quota reservation.

Each hook is optional: :class:`~meter.forward.handler.Proxy` without a tenancy hook only fingerprints keys,
without a quota hook limits nothing, without a trace hook pays nothing for tracing.

Rule 1: the tenancy and trace hooks are synchronous and in memory; of the quota hook only ``admit`` is
        awaited before forwarding, and ``start_settle`` returns at once with the work in a task.
Rule 2: a store failure is never the forward path's exception: ``admit`` answers it with its failure
        policy (a result), ``start_settle``'s task swallows it. ``resolve`` raises a MeterError only
        as the client's answer (401, 500, 503).
Rule 3: a reservation is settled with what the record says was used (:func:`settlement_usage`).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from meter.records import Outcome, Usage, UsageRecord, UsageSource
from meter.tap.request import RequestInfo
from meter.tenancy.keys import Resolution

if TYPE_CHECKING:  # values the hooks hand back and forth (OpenTelemetry is imported only when on)
    from opentelemetry.trace import Span

    from meter.quota.admission import AdmissionResult
    from meter.quota.store import Reservation

Scope = dict[str, Any]  # the ASGI scope: its values are the server's (the ASGI spec types them so)


class TenancyHook(Protocol):
    """Teams, keys and prices (:class:`meter.tenancy.runtime.Tenancy`). Absent, keys are only
    fingerprinted, records carry no team and no cost."""

    def resolve(self, key: str | None) -> Resolution:
        """Synchronous and in memory; raises a MeterError (401/500/503) for a key it refuses."""
        ...

    def cost(
        self, started_at: datetime, requested_model: str | None, response_model: str | None, usage: Usage
    ) -> tuple[int | None, str | None]:
        """``(cost_nanos, price_ref)``; never raises."""
        ...


class QuotaHook(Protocol):
    """Admission (:class:`meter.quota.admission.Admission`). Absent, nothing is limited."""

    # Whether a settle started before an admit is applied before it without being awaited (the
    # store's ``ordered``); if not, the forward path awaits a connection's previous settle.
    ordered: bool

    async def admit(
        self, team: str, key_fp: str | None, info: RequestInfo, now: datetime, *, endpoint: str | None = None
    ) -> AdmissionResult:
        """``allowed``, ``reservation``, ``headers``, ``rejection``."""
        ...

    def start_settle(
        self, reservation: Reservation, usage: Usage | None, cost: Decimal | None, now: datetime
    ) -> asyncio.Task[object]:
        """Settle as a task that runs to completion whether awaited or not; never fails for store
        failures."""
        ...


class TraceHook(Protocol):
    """Tracing, when enabled (see :mod:`meter.sinks.tracing`). Absent, the forward path pays nothing
    for it."""

    def start(self, scope: Scope, info: RequestInfo, start_time_ns: int) -> Span | None:
        """Open a span for the request (None: tracing failed; the request goes on without one)."""
        ...

    def propagation_headers(self, span: Span | None) -> list[tuple[str, str]]:
        """Headers (``traceparent``, ``tracestate``) that replace the client's on the upstream request."""
        ...

    def finish(self, span: Span | None, record: UsageRecord) -> None: ...


def settlement_usage(record: UsageRecord) -> Usage | None:
    """What a finished request consumed, for settling its reservation. None means "unknown": the
    whole reservation is charged (a stream cut before any usage, an upstream that timed out and may
    still have generated). An upstream error without usage, or a request that never reached the
    upstream, consumed nothing."""
    if record.usage_source is not UsageSource.MISSING:
        return Usage(
            record.prompt_tokens,
            record.completion_tokens,
            record.cached_tokens,
            record.reasoning_tokens,
            record.total_tokens,
        )
    if record.outcome is Outcome.UPSTREAM_ERROR and record.status_code >= 400:
        return Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    if record.outcome is Outcome.PROXY_ERROR and record.status_code != 504:
        return Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)  # upstream unreachable
    return None
