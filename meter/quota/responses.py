"""What clients see of quotas: 429 bodies in OpenAI's shape and OpenAI's rate-limit headers.

Rule 1 (budgets are final): a budget rejection is ``429 {"type": "insufficient_quota", "code":
        "insufficient_quota"}`` with ``x-should-retry: false``; no retry can cure it before the period
        resets, and the openai SDK obeys that header instead of retrying 429s.
Rule 2 (rates say when): a rate rejection is ``429 {"type": "requests" | "tokens", "code":
        "rate_limit_exceeded"}`` with ``retry-after`` (whole seconds, rounded up) and ``retry-after-ms``
        (the openai SDK prefers the latter). A request larger than the whole ``tpm`` can never pass, so
        it gets ``x-should-retry: false`` and no ``retry-after``.
Rule 3 (the store being down is not the client's fault): fail-closed admission answers ``503`` with
        an ``api_error``/``quota_unavailable`` body and ``retry-after: 1``, which the SDK retries with
        backoff; a 429 ``insufficient_quota`` would falsely tell the client its budget is gone.
Rule 4: ``x-ratelimit-*`` headers describe the most constraining subject (least remaining) for
        requests and for tokens; ``reset`` is the time until the window is empty again ("resets to its
        initial state", OpenAI's definition), formatted like Go durations as OpenAI does ("1s",
        "6m0s", "120ms").

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from meter.errors import error_body
from meter.quota.decision import Breach, LimitKind
from meter.quota.policy import Subject
from meter.quota.spend import from_micros

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class RateState:
    """One rate limit of one subject after admission: ``remaining`` of ``limit``, ``reset_ms`` until
    the window is empty."""

    limit: int
    remaining: int
    reset_ms: int


@dataclass(frozen=True, slots=True)
class RateSnapshot:
    requests: RateState | None = None
    tokens: RateState | None = None


def tighter(a: RateState | None, b: RateState | None) -> RateState | None:
    if a is None:
        return b
    if b is None:
        return a
    return b if (b.remaining, b.limit) < (a.remaining, a.limit) else a


def format_reset(ms: int) -> str:
    """Go's ``time.Duration.String()`` at millisecond resolution: "0s", "120ms", "1.5s", "6m0s",
    "1h2m3s"."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    sec = f"{seconds}.{millis:03d}".rstrip("0").rstrip(".") if millis else str(seconds)
    if hours:
        return f"{hours}h{minutes}m{sec}s"
    if minutes:
        return f"{minutes}m{sec}s"
    return f"{sec}s"


def ratelimit_headers(snapshot: RateSnapshot | None) -> Headers:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the limits that exist."""
    if snapshot is None:
        return []
    headers: Headers = []
    for name, state in ((b"requests", snapshot.requests), (b"tokens", snapshot.tokens)):
        if state is not None:
            headers += [
                (b"x-ratelimit-limit-" + name, str(state.limit).encode()),
                (b"x-ratelimit-remaining-" + name, str(max(state.remaining, 0)).encode()),
                (b"x-ratelimit-reset-" + name, format_reset(state.reset_ms).encode()),
            ]
    return headers


@dataclass(frozen=True, slots=True)
class Rejection:
    """A complete HTTP answer: send ``status``, ``headers`` (content-type and -length included) and
    ``body`` as they are. ``reason`` is the ``reason`` label of ``meter_quota_rejections_total``."""

    status: int
    body: bytes
    headers: Headers
    reason: str
    message: str  # the body's error message (the usage record's ``error``)
    breach: Breach | None = None


_NOUN = {
    LimitKind.BUDGET_TOKENS: "token budget",
    LimitKind.BUDGET_PROMPT_TOKENS: "prompt token budget",
    LimitKind.BUDGET_COMPLETION_TOKENS: "completion token budget",
}
_PERIOD_ADJECTIVE = {"day": "daily", "week": "weekly", "month": "monthly"}


def _usd(micros: int) -> str:
    value = from_micros(micros)
    return f"${value:.2f}" if value == value.quantize(_CENT) else f"${value.normalize():f}"


_CENT = from_micros(10_000)


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"


def breach_message(breach: Breach, period: str | None = None) -> str:
    who = breach.subject.describe()
    kind = breach.kind
    if kind.is_budget:
        adjective = _PERIOD_ADJECTIVE.get(period or "", "period")
        if kind is LimitKind.BUDGET_USD:
            what = f"{adjective} budget"
            amounts = (
                f"limit {_usd(breach.limit)}, used {_usd(breach.used)}, "
                f"this request reserves up to {_usd(breach.requested)}"
            )
        else:
            what = f"{adjective} {_NOUN[kind]}"
            amounts = (
                f"limit {breach.limit} tokens, used {breach.used}, "
                f"this request reserves up to {breach.requested}"
            )
        resets = f" It resets at {breach.resets_at.isoformat()}." if breach.resets_at is not None else ""
        return f"You exceeded the {what} of {who}: {amounts}.{resets}"
    if kind is LimitKind.CONCURRENCY:
        return (
            f"Too many concurrent requests for {who}: limit {breach.limit}, in flight {breach.used}. "
            "Please try again when one of them has finished."
        )
    label = "requests per min (RPM)" if kind is LimitKind.RPM else "tokens per min (TPM)"
    if breach.retry_after_ms is None:
        return (
            f"Request too large for {label} of {who}: limit {breach.limit}, requested {breach.requested}. "
            "Reduce the prompt or max_tokens."
        )
    return (
        f"Rate limit reached for {label} of {who}: limit {breach.limit}, used {breach.used}, "
        f"requested {breach.requested}. Please try again in {_seconds(breach.retry_after_ms)}."
    )


def _finish(body: bytes, headers: Headers) -> Headers:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]


def reject(breach: Breach, snapshot: RateSnapshot | None = None, period: str | None = None) -> Rejection:
    """The 429 for ``breach`` (Rules 1 and 2), with the rate-limit headers of ``snapshot``."""
    message = breach_message(breach, period)
    extra: Headers = []
    if breach.kind.is_budget:
        body = error_body(message, "insufficient_quota", "insufficient_quota")
        extra.append((b"x-should-retry", b"false"))
    else:
        kind = "tokens" if breach.kind is LimitKind.TPM else "requests"
        body = error_body(message, kind, "rate_limit_exceeded")
        if breach.retry_after_ms is None:
            extra.append((b"x-should-retry", b"false"))
        else:
            ms = max(breach.retry_after_ms, 1)
            extra += [
                (b"retry-after", str(-(-ms // 1000)).encode()),
                (b"retry-after-ms", str(ms).encode()),
            ]
    headers = _finish(body, extra + ratelimit_headers(snapshot))
    return Rejection(429, body, headers, breach.kind.value, message, breach)


UNAVAILABLE_REASON = "store_unavailable"


def unavailable(subject: Subject | None = None, retry_after_s: int = 1) -> Rejection:
    """Rule 3: the quota store is unreachable and a limit fails closed."""
    who = f" for {subject.describe()}" if subject is not None else ""
    message = (
        f"meter cannot check the quota{who} right now (its quota store is unavailable); please retry shortly."
    )
    body = error_body(message, "api_error", "quota_unavailable")
    headers = _finish(body, [(b"retry-after", str(retry_after_s).encode())])
    return Rejection(503, body, headers, UNAVAILABLE_REASON, message)
