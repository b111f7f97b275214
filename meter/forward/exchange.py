"""One request's life through the forward path, as one state machine, and the record it ends in.

    RECEIVED ──► ADMITTED ──► FORWARDING ──► RELAYING ──► COMPLETE ──┐
        │            │             │             │                   ├──► PUBLISHED
        └────────────┴─────────────┴─────────────┴──► ABORTED ───────┤
                                                 └──► FAILED ────────┘

RECEIVED    the head is in; the body, identity and quota admission come next
ADMITTED    the key resolved and the quota (if any) reserved: the request may go upstream
FORWARDING  the request went upstream; its answer has not begun
RELAYING    the response head went to the client; body chunks follow
COMPLETE    the response is complete in the client's eyes (its last byte, or a stream's [DONE], is
            about to go out); the rest of the body, if any, is still relayed
ABORTED     the client went away first
FAILED      meter refused the request or could not complete it (its own answer, or a cut connection)
PUBLISHED   the record went to the sinks (metrics, logs, OpenTelemetry) and the span ended

Rule 1 (h11's rule 1): everything that moves an exchange between phases goes through
        :func:`advance`; an illegal move raises. COMPLETE, ABORTED and FAILED are the ends: entering
        one builds the request's one record (journaled, its reservation settled: the handler's
        transition function), and an end is entered once, because no end leads to another.
Rule 2: PUBLISHED follows an end, once: no end is published twice, and nothing is published unended.
Rule 3: the outcome a record carries follows from the end and the facts kept on the exchange: FAILED is
        ``rejected`` (a quota refused it) or ``proxy_error``; ABORTED is ``aborted``; COMPLETE is
        ``upstream_error`` (a status of 400 or more, or an error event in the stream) or ``ok``.

Pure but for the clock readings the handler stores on the exchange: no I/O.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from meter import bounds
from meter.bounds import cut, cut_optional
from meter.errors import MeterError
from meter.records import Outcome, Usage, UsageRecord, UsageSource, new_event_id
from meter.tap.observer import Observation
from meter.tap.request import EMPTY, RequestInfo

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from meter.quota.responses import Rejection
    from meter.quota.store import Reservation

Scope = dict[str, Any]
# (started_at, requested model, response model, usage) -> (cost_nanos, price_ref); never raises
Pricing = Callable[[datetime, str | None, str | None, Usage], tuple[int | None, str | None]]


class Phase(enum.Enum):
    RECEIVED = "received"
    ADMITTED = "admitted"
    FORWARDING = "forwarding"
    RELAYING = "relaying"
    COMPLETE = "complete"
    ABORTED = "aborted"
    FAILED = "failed"
    PUBLISHED = "published"


ENDS = frozenset({Phase.COMPLETE, Phase.ABORTED, Phase.FAILED})
_NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.RECEIVED: frozenset({Phase.ADMITTED, Phase.ABORTED, Phase.FAILED}),
    Phase.ADMITTED: frozenset({Phase.FORWARDING, Phase.ABORTED, Phase.FAILED}),
    Phase.FORWARDING: frozenset({Phase.RELAYING, Phase.ABORTED, Phase.FAILED}),
    Phase.RELAYING: frozenset({Phase.COMPLETE, Phase.ABORTED, Phase.FAILED}),
    Phase.COMPLETE: frozenset({Phase.PUBLISHED}),
    Phase.ABORTED: frozenset({Phase.PUBLISHED}),
    Phase.FAILED: frozenset({Phase.PUBLISHED}),
    Phase.PUBLISHED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A bug: the forward path tried a move Rule 1 does not allow."""


def advance(phase: Phase, to: Phase) -> Phase:
    """``to``, if the table allows it from ``phase`` (Rule 1); raises :class:`IllegalTransition`."""
    if to not in _NEXT[phase]:
        raise IllegalTransition(f"an exchange cannot go from {phase.value} to {to.value}")
    return to


class Exchange:
    """One request's state: its phase and the facts its record is built from."""

    __slots__ = (
        "client_gone",
        "end",
        "endpoint",
        "error",
        "info",
        "key_fingerprint",
        "key_suffix",
        "observation",
        "phase",
        "quota_headers",
        "record",
        "rejection",
        "request_bytes",
        "request_id",
        "reservation",
        "response_bytes",
        "scope",
        "settling",
        "span",
        "start_ns",
        "status",
        "t0",
        "t_client_headers",
        "t_forward",
        "t_upstream_headers",
        "team",
        "watcher",
    )

    def __init__(self, scope: Scope, t0: float, start_ns: int) -> None:
        self.scope = scope
        self.t0 = t0  # the handler's monotonic clock when the server handed the request over
        self.start_ns = start_ns  # wall clock, for started_at
        self.phase = Phase.RECEIVED
        self.end: Phase | None = None  # the end reached (Rule 1), kept when PUBLISHED follows
        self.endpoint: str = scope["path"]
        self.info: RequestInfo = EMPTY
        self.team = ""
        self.key_fingerprint: str | None = None
        self.key_suffix: str | None = None
        self.client_gone = False  # the client disconnected (a fact: the end says what it meant)
        self.error: MeterError | None = None  # meter's reason for a FAILED end
        self.rejection: Rejection | None = None  # the quota's answer for a FAILED end
        self.reservation: Reservation | None = None
        self.quota_headers: list[tuple[bytes, bytes]] | None = None
        self.span: Span | None = None
        self.status = 0
        self.request_id: str | None = None
        self.request_bytes = 0
        self.response_bytes = 0
        self.t_forward: float | None = None
        self.t_upstream_headers: float | None = None
        self.t_client_headers: float | None = None
        self.observation: Observation | None = None
        self.record: UsageRecord | None = None
        self.settling: asyncio.Task[object] | None = None
        self.watcher: asyncio.Task[None] | None = None

    @property
    def started_at(self) -> datetime:
        return datetime.fromtimestamp(self.start_ns / 1e9, UTC)


def outcome(end: Phase, x: Exchange) -> Outcome:
    """Rule 3."""
    if end is Phase.FAILED:
        return Outcome.REJECTED if x.rejection is not None else Outcome.PROXY_ERROR
    if end is Phase.ABORTED:
        return Outcome.ABORTED
    obs = x.observation
    if x.status >= 400 or (obs is not None and obs.stream_error):
        return Outcome.UPSTREAM_ERROR
    return Outcome.OK


def build_record(x: Exchange, end: Phase, t_end: float, price: Pricing | None) -> UsageRecord:
    """The exchange's record, at its ``end`` (``t_end`` on the handler's clock)."""
    t0 = x.t0
    started_at = x.started_at
    obs = x.observation

    def ms(since: float | None, until: float | None) -> float | None:
        return None if since is None or until is None else (until - since) * 1000.0

    overhead = None
    if x.t_forward is not None:  # before forwarding, plus from the upstream's head to the client's
        overhead = x.t_forward - t0
        if x.t_upstream_headers is not None and x.t_client_headers is not None:
            overhead += x.t_client_headers - x.t_upstream_headers
    usage_kwargs: dict[str, Any] = {}
    ttft_ms = tokens_per_second = None
    if obs is not None:
        usage = obs.usage
        usage_kwargs = {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "total_tokens": usage.total_tokens,
            "response_id": obs.response_id,
            "response_model": obs.response_model,
            "finish_reason": ",".join(obs.finish_reasons) or None,
            "server_ttft_ms": None if obs.server_ttft_s is None else obs.server_ttft_s * 1000.0,
            "server_processing_ms": (
                None if obs.server_processing_s is None else obs.server_processing_s * 1000.0
            ),
            "upstream_metrics": obs.upstream_metrics,
        }
        if obs.streamed:
            ttft_ms = ms(t0, obs.first_content_at)
        generation_start = obs.first_content_at if obs.streamed else x.t_forward
        if usage.completion_tokens and generation_start is not None and t_end > generation_start:
            tokens_per_second = usage.completion_tokens / (t_end - generation_start)
        if price is not None:
            usage_kwargs["cost_nanos"], usage_kwargs["price_ref"] = price(
                started_at, x.info.model, obs.response_model, usage
            )
    if x.rejection is not None:
        error: str | None = x.rejection.message
    elif x.error is not None:
        error = x.error.message
    else:
        error = obs.error_message if obs is not None else None
    scope = x.scope
    return UsageRecord(
        event_id=new_event_id(),
        started_at=started_at,
        method=cut(scope["method"], bounds.METHOD),
        endpoint=cut(scope["path"], bounds.ENDPOINT),
        status_code=x.status,
        outcome=outcome(end, x),
        usage_source=obs.usage_source if obs is not None else UsageSource.MISSING,
        stream=x.info.stream,
        key_fingerprint=x.key_fingerprint,
        key_suffix=x.key_suffix,
        team=x.team,
        requested_model=x.info.model,
        request_id=x.request_id,
        duration_ms=(t_end - t0) * 1000.0,
        upstream_headers_ms=ms(t0, x.t_upstream_headers),
        ttft_ms=ttft_ms,
        output_tokens_per_second=tokens_per_second,
        overhead_ms=None if overhead is None else overhead * 1000.0,
        request_bytes=x.request_bytes,
        response_bytes=x.response_bytes,
        error=cut_optional(error, bounds.ERROR),
        **usage_kwargs,
    )


def reduced_record(x: Exchange, end: Phase) -> UsageRecord:
    """The record of an exchange whose full record could not be built: who, what and how it ended."""
    scope = x.scope
    return UsageRecord(
        event_id=new_event_id(),
        started_at=x.started_at,
        method=cut(str(scope.get("method", "")), bounds.METHOD),
        endpoint=cut(str(scope.get("path", "")), bounds.ENDPOINT),
        status_code=x.status,
        outcome=Outcome.ABORTED if end is Phase.ABORTED else Outcome.PROXY_ERROR,
        usage_source=UsageSource.MISSING,
        stream=x.info.stream,
        key_fingerprint=x.key_fingerprint,
        key_suffix=x.key_suffix,
        team=x.team,
        requested_model=x.info.model,
        request_bytes=x.request_bytes,
        response_bytes=x.response_bytes,
        error="meter could not build this request's full record; its log has the details",
    )
