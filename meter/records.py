"""The values that flow from the observer to the sinks: token usage and the per-request usage record.

Invariants:

Rule 1: "not reported" is not zero. Every token count is ``int | None``; ``None`` means nobody told us.
Rule 2: every record says where its numbers came from (:class:`UsageSource`), so billing can tell a
        stream the upstream reported from one meter had to estimate or could not count at all.
Rule 3: the requested model (from the client's body) and the response model (from the upstream's
        answer) are kept apart; they differ whenever the upstream resolves an alias.
Rule 4: nothing here holds a raw API key, only its HMAC fingerprint and a display suffix.
Rule 5: money is an integer: ``cost_nanos`` (nano-USD, rounded once by meter.billing.rating); ``cost_usd`` is
        the same amount as an exact Decimal.

This module is pure: it imports nothing from litestar, httpx, aiohttp or SQLAlchemy.
"""

from __future__ import annotations

import enum
import itertools
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TypeVar

_T = TypeVar("_T")


class UsageSource(enum.StrEnum):
    REPORTED = "reported"  # the upstream said so (body usage, or fireworks-*-tokens headers)
    ESTIMATED = "estimated"  # meter counted what it relayed (e.g. a stream the client aborted)
    MISSING = "missing"  # nothing to go on


class Outcome(enum.StrEnum):
    OK = "ok"  # upstream answered 2xx and the response was relayed to the end
    UPSTREAM_ERROR = "upstream_error"  # upstream answered non-2xx, or sent an error event mid-stream
    ABORTED = "aborted"  # the client went away before the response was complete
    PROXY_ERROR = "proxy_error"  # meter could not complete the exchange (upstream down, timeout, ...)
    REJECTED = "rejected"  # meter refused it before forwarding: a quota (429) or its store down (503)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one response. ``cached_tokens`` are counted inside ``prompt_tokens``
    (Fireworks' and OpenAI's convention); ``reasoning_tokens`` inside ``completion_tokens``."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None

    @property
    def is_empty(self) -> bool:
        return self.prompt_tokens is None and self.completion_tokens is None and self.total_tokens is None


def first_known(value: _T | None, fallback: _T | None) -> _T | None:
    """``value`` unless it is None (unlike ``or``, a reported 0 is kept)."""
    return value if value is not None else fallback


def _new_id_source() -> None:
    """A random 32-bit process tag and a counter from a random start: unique ids without a system
    call per request (in a fork, too: the child draws its own)."""
    global _tag, _counter
    _tag = os.urandom(4).hex()
    _counter = itertools.count(int.from_bytes(os.urandom(6), "big"))


_tag = ""
_counter = itertools.count()
_new_id_source()
os.register_at_fork(after_in_child=_new_id_source)
_MASK48 = (1 << 48) - 1


def new_event_id() -> str:
    """A 32-hex-digit id: the millisecond clock (12 digits, so ids sort by time, as in UUIDv7), this
    process's random tag (8) and its counter (12). Unique within a process by the counter, across
    processes by the tag and the clock."""
    return f"{time.time_ns() // 1_000_000:012x}{_tag}{next(_counter) & _MASK48:012x}"


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One forwarded (or refused) request: exactly one record per request that reached meter's proxy.

    Times are UTC; durations are milliseconds as floats (they are measurements, not money).
    """

    event_id: str
    started_at: datetime
    method: str
    endpoint: str  # the request path without query string, e.g. "/v1/chat/completions"
    status_code: int  # the status meter returned to the client
    outcome: Outcome
    usage_source: UsageSource
    stream: bool = False
    key_fingerprint: str | None = None  # hex HMAC-SHA256 of the key under the server secret
    key_suffix: str | None = None  # "...abcd"
    team: str = ""
    requested_model: str | None = None
    response_model: str | None = None
    response_id: str | None = None  # the upstream's id for the completion ("chatcmpl-...")
    request_id: str | None = None  # the upstream's x-request-id header
    finish_reason: str | None = None  # comma-joined, one per choice in index order when n > 1
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    duration_ms: float | None = None  # request arrival -> last byte sent to the client
    upstream_headers_ms: float | None = None  # request arrival -> upstream response headers
    ttft_ms: float | None = None  # request arrival -> first content chunk relayed (streams)
    output_tokens_per_second: float | None = None
    overhead_ms: float | None = None  # time meter itself added (see meter.forward.handler)
    server_ttft_ms: float | None = None  # fireworks-server-time-to-first-token
    server_processing_ms: float | None = None  # fireworks-server-processing-time
    upstream_metrics: dict[str, float] = field(
        default_factory=dict
    )  # other numeric fireworks-* / perf_metrics
    request_bytes: int = 0
    response_bytes: int = 0
    error: str | None = None  # short reason for proxy errors and upstream error messages
    # Set by pricing (meter.billing.rating) before the record is journaled: the cost in whole nano-USD, and
    # the price row used ("db:17", "sheet:2025-08-01:<model>", ...). Both None: unpriced, or no usage.
    cost_nanos: int | None = None
    price_ref: str | None = None

    @property
    def cost_usd(self) -> Decimal | None:
        """``cost_nanos`` as exact USD (None: not priced). Monitoring reads this; billing sums nanos."""
        return None if self.cost_nanos is None else Decimal(self.cost_nanos).scaleb(-9)

    @property
    def usage(self) -> Usage:
        return Usage(
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.reasoning_tokens,
            self.total_tokens,
        )
