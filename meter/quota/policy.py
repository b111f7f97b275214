"""Quota policies and the pure arithmetic of admission: limits, periods, estimates, and ``decide``.

A *policy* is the :class:`Limits` set on one :class:`Subject` (a team, or a key fingerprint). A
request is checked against its team's policy and its key's policy, and must pass all of them.

Rule 1 (money is exact): prices and costs are ``Decimal``; the stores count integer micro-USD. A
        reservation rounds *up* (:func:`to_micros`), so admission sees a cost at least as large as
        the exact one; budget limits round *down*. Settled spend rounds to the *nearest* micro-USD,
        half to even (:meth:`Spend.cost_micros`): rounding every request up would overcount a cheap
        request by up to a micro-USD (~17% of a 30-token request at $0.20 per 1M tokens) and drift
        away from the exact sums in the database, from which restarts seed the counters.
Rule 2 (periods are calendar-aligned): a budget period is the local day, ISO week (Monday 00:00) or
        month containing ``now`` in the configured time zone (:func:`period_window`). A request is
        charged to the period it was admitted in, even when it settles after the period ended.
Rule 3 (rate windows are exact sliding windows): a request counts towards ``rpm`` and its tokens
        towards ``tpm`` at its admission time ``t`` (millisecond resolution) until ``t + 60 s``. A
        request is admitted only if, counting it, the admissions in ``(t - 60 s, t]`` stay within the
        limit, so *every* 60-second interval holds at most ``rpm`` admitted requests and at most ``tpm``
        tokens as reserved (a later settle replaces the reservation by the actual tokens; only the
        excess of actual over reserved can exceed ``tpm``, as for budgets).
Rule 4 (one refusal rule): a counter with ``used`` of ``limit`` admits a request asking ``requested``
        iff ``used < limit`` and ``used + requested <= limit``. The first part refuses requests once a
        limit is reached even when they reserve nothing (an unpriced model against a USD budget).
Rule 5 (which limit is reported): limits are checked in :class:`LimitKind` order (budgets before
        rates, the USD budget first); across subjects the lowest-ranked breach wins, the earlier
        subject on a tie. The Redis script follows the same rules; the contract tests hold both to it.

This module is pure: it imports nothing from redis, litestar, httpx or SQLAlchemy.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as dtime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Literal, Protocol

from meter.records import Usage
from meter.request_info import RequestInfo

Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")
WINDOW_MS = 60_000  # the rpm/tpm window
MICROS = Decimal(1_000_000)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


# --- policies ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one subject. ``None`` means "no limit of this kind"; ``0`` refuses everything.

    ``budget_period`` applies to all budgets (USD and tokens). ``soft_ratio`` is the share of a budget
    at which meter raises a metric and a log line (once per period and limit).
    """

    budget_usd: Decimal | None = None
    budget_period: Period = "month"
    tokens_budget: int | None = None
    prompt_tokens_budget: int | None = None
    completion_tokens_budget: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    soft_ratio: Decimal = Decimal("0.8")
    # Derived once (admission reads them on every request): the limit per LimitKind rank (micro-USD
    # for the USD budget) and the soft threshold per budget kind (None: no limit, or a zero one).
    by_rank: tuple[int | None, ...] = field(init=False, repr=False, compare=False)
    soft_by_rank: tuple[int | None, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.budget_period not in PERIODS:
            raise ValueError(f"budget_period must be one of {', '.join(PERIODS)}, not {self.budget_period!r}")
        if self.budget_usd is not None:
            if not isinstance(self.budget_usd, Decimal) or not self.budget_usd.is_finite():
                raise ValueError("budget_usd must be a finite Decimal")
            if self.budget_usd < 0:
                raise ValueError("budget_usd must not be negative")
        for name in _INT_LIMITS:
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None")
        if not isinstance(self.soft_ratio, Decimal) or not Decimal(0) < self.soft_ratio <= Decimal(1):
            raise ValueError("soft_ratio must be a Decimal in (0, 1]")
        budget = (
            None
            if self.budget_usd is None
            else int((self.budget_usd * MICROS).to_integral_value(ROUND_FLOOR))
        )
        by_rank = (budget, *(getattr(self, name) for name in _INT_LIMITS))
        soft = tuple(soft_threshold(v, self.soft_ratio) if v else None for v in by_rank[:4])
        object.__setattr__(self, "by_rank", by_rank)
        object.__setattr__(self, "soft_by_rank", soft)

    @property
    def budget_micros(self) -> int | None:
        return self.by_rank[0]

    @property
    def has_rates(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    @property
    def is_empty(self) -> bool:
        return self.budget_usd is None and all(getattr(self, name) is None for name in _INT_LIMITS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (money as a string, so it stays exact)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        out["budget_usd"] = None if self.budget_usd is None else str(self.budget_usd)
        out["soft_ratio"] = str(self.soft_ratio)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        """Parse and validate (admin API, config files); the ValueError names the offending field."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown quota limit(s): {', '.join(unknown)}")
        values = dict(data)
        for name in ("budget_usd", "soft_ratio"):
            raw = values.get(name)
            if raw is not None and not isinstance(raw, Decimal):
                if isinstance(raw, bool) or not isinstance(raw, str | int | float):
                    raise ValueError(f"{name} must be a decimal number")
                try:
                    values[name] = Decimal(str(raw))
                except InvalidOperation:
                    raise ValueError(f"{name} must be a decimal number, not {raw!r}") from None
            elif name == "soft_ratio" and raw is None:
                values.pop(name, None)
        return cls(**values)


_INT_LIMITS = (
    "tokens_budget",
    "prompt_tokens_budget",
    "completion_tokens_budget",
    "rpm",
    "tpm",
    "max_concurrent",
)


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a policy is set on: ``Subject("team", "acme")`` or ``Subject("key", <fingerprint>)``."""

    kind: Literal["team", "key"]
    name: str

    @property
    def id(self) -> str:
        """Stable identifier used in store keys."""
        return f"{self.kind}:{self.name}"

    def describe(self) -> str:
        """For messages shown to clients: never the fingerprint."""
        return f"team '{self.name}'" if self.kind == "team" else "this API key"


@dataclass(frozen=True, slots=True)
class Policy:
    subject: Subject
    limits: Limits


# --- periods -----------------------------------------------------------------------------------------


def period_window(period: Period, now: datetime, tz: tzinfo = UTC) -> tuple[datetime, datetime]:
    """The calendar period containing ``now`` in ``tz``: ``[start, end)`` as aware datetimes in ``tz``.

    Days follow local midnights (23 or 25 hours across DST changes); weeks start on ISO Monday; months
    on the 1st. A midnight that does not exist locally (DST at 00:00) resolves to the transition instant.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    today = now.astimezone(tz).date()
    if period == "day":
        start, end = today, today + timedelta(days=1)
    elif period == "week":
        start = today - timedelta(days=today.weekday())
        end = start + timedelta(days=7)
    elif period == "month":
        start = today.replace(day=1)
        end = date(start.year + (start.month == 12), start.month % 12 + 1, 1)
    else:
        raise ValueError(f"unknown period {period!r}")
    return datetime.combine(start, dtime(), tzinfo=tz), datetime.combine(end, dtime(), tzinfo=tz)


def to_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch (exact; no float)."""
    return (moment - EPOCH) // _MS


def to_epoch_seconds(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(seconds=1)


def from_ms(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


# --- prices, estimates, actual spend ------------------------------------------------------------------


class Price(Protocol):
    """USD per one million tokens. ``cached_input`` None: cached prompt tokens cost ``input``."""

    @property
    def input(self) -> Decimal: ...

    @property
    def cached_input(self) -> Decimal | None: ...

    @property
    def output(self) -> Decimal: ...


PriceFn = Callable[[str | None], Price | None]


def to_micros(usd: Decimal) -> int:
    """Integer micro-USD, rounded up (Rule 1)."""
    return int((usd * MICROS).to_integral_value(ROUND_CEILING))


def from_micros(micros: int) -> Decimal:
    return Decimal(micros) / MICROS


def cost_usd(price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Decimal:
    """Exact cost; ``cached_tokens`` are part of ``prompt_tokens``."""
    cached = min(max(cached_tokens, 0), prompt_tokens)
    cached_price = price.cached_input if price.cached_input is not None else price.input
    return (
        (prompt_tokens - cached) * price.input + cached * cached_price + completion_tokens * price.output
    ) / MICROS


@dataclass(frozen=True, slots=True)
class Estimate:
    """What admission reserves for one request."""

    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    model: str | None = None
    cost_micros: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cost_micros", to_micros(self.cost_usd))

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def requested(self) -> tuple[int, ...]:
        """What the request asks of each limit, by LimitKind rank."""
        total = self.prompt_tokens + self.completion_tokens
        return (self.cost_micros, total, self.prompt_tokens, self.completion_tokens, 1, total, 1)


ZERO_ESTIMATE = Estimate(0, 0, Decimal(0))
# Chat templates add a few tokens per message (role markers, separators: 4-7 for Llama 3 and ChatML);
# the text estimate (ceil(chars / 4)) knows nothing of them, and the reservation must not fall short.
TEMPLATE_TOKENS_PER_MESSAGE = 8
_OUTPUT_CAPS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def _non_negative_int(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def estimate(
    info: RequestInfo, price: Price | None, default_max_tokens: int, *, endpoint: str | None = None
) -> Estimate:
    """A conservative reservation for a request: the prompt estimate from the body (plus
    ``TEMPLATE_TOKENS_PER_MESSAGE`` per chat message) plus the output cap
    (``max_completion_tokens``, ``max_tokens`` or ``max_output_tokens``; ``default_max_tokens`` when
    absent) times ``n``, all priced at the full input and output price. Embeddings reserve no output.
    A body that is not JSON reserves nothing (it still counts as a request). Unpriced models reserve
    $0 (their tokens still count against token budgets and ``tpm``)."""
    body = info.json
    if body is None:
        return Estimate(0, 0, Decimal(0), info.model)
    prompt = info.prompt_tokens_estimate or 0
    messages = body.get("messages")
    if type(messages) is list:  # the chat template wraps every message in tokens of its own
        prompt += TEMPLATE_TOKENS_PER_MESSAGE * len(messages)
    if endpoint is not None and endpoint.endswith("/embeddings"):
        completion = 0
    else:
        cap = next(
            (v for v in (_non_negative_int(body.get(name)) for name in _OUTPUT_CAPS) if v is not None),
            default_max_tokens,
        )
        n = _non_negative_int(body.get("n"))
        completion = cap * (n if n is not None and n > 1 else 1)
    cost = cost_usd(price, prompt, completion) if price is not None else Decimal(0)
    return Estimate(prompt, completion, cost, info.model)


@dataclass(frozen=True, slots=True)
class Spend:
    """What a request actually used (or a rollup's period total, for seeding)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: Decimal = Decimal(0)

    @property
    def cost_micros(self) -> int:
        return int((self.cost_usd * MICROS).to_integral_value(ROUND_HALF_EVEN))


def actual_spend(estimate: Estimate, usage: Usage | None, cost: Decimal | None, price: Price | None) -> Spend:
    """The spend to settle. "Not reported is not zero": ``usage`` None (consumption unknown, e.g. a
    stream cut before any usage) charges the whole estimate; a missing field falls back to the
    estimate's value. ``cost`` None is computed from the tokens and ``price`` (the estimate's cost
    when the model is unpriced). Pass ``Usage(prompt_tokens=0, completion_tokens=0)`` for a request
    that consumed nothing (the upstream refused it)."""
    if usage is None:
        return Spend(
            estimate.prompt_tokens, estimate.completion_tokens, estimate.total_tokens, estimate.cost_usd
        )
    prompt = usage.prompt_tokens if usage.prompt_tokens is not None else estimate.prompt_tokens
    if usage.completion_tokens is not None:
        completion = usage.completion_tokens
    elif usage.total_tokens is not None and usage.prompt_tokens is not None:
        completion = max(usage.total_tokens - usage.prompt_tokens, 0)
    else:
        completion = estimate.completion_tokens
    total = usage.total_tokens if usage.total_tokens is not None else prompt + completion
    if cost is None:
        if price is not None:
            cost = cost_usd(price, prompt, completion, usage.cached_tokens or 0)
        else:
            cost = estimate.cost_usd
    return Spend(prompt, completion, total, cost)


# --- decide ------------------------------------------------------------------------------------------


class LimitKind(enum.StrEnum):
    """In check order (Rule 5). The value is the ``reason`` label of the rejection metric."""

    BUDGET_USD = "budget_usd"
    BUDGET_TOKENS = "budget_tokens"
    BUDGET_PROMPT_TOKENS = "budget_prompt_tokens"
    BUDGET_COMPLETION_TOKENS = "budget_completion_tokens"
    RPM = "rpm"
    TPM = "tpm"
    CONCURRENCY = "concurrency"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def is_budget(self) -> bool:
        return self.rank < _RANK[LimitKind.RPM]


_RANK = {kind: i for i, kind in enumerate(LimitKind)}
KIND_BY_RANK: tuple[LimitKind, ...] = tuple(LimitKind)
BUDGET_KINDS: tuple[LimitKind, ...] = KIND_BY_RANK[:4]


@dataclass(frozen=True, slots=True)
class Counters:
    """One subject's state as admission sees it: the period's settled and reserved amounts, the rate
    window (admissions in the last 60 s) and the requests in flight."""

    spent_micros: int = 0
    reserved_micros: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reserved_prompt_tokens: int = 0
    reserved_completion_tokens: int = 0
    window_requests: int = 0
    window_tokens: int = 0
    inflight: int = 0

    def used_by_rank(self) -> tuple[int, ...]:
        """Use of each limit (settled + reserved for budgets), by LimitKind rank."""
        reserved_tokens = self.reserved_prompt_tokens + self.reserved_completion_tokens
        return (
            self.spent_micros + self.reserved_micros,
            self.tokens + reserved_tokens,
            self.prompt_tokens + self.reserved_prompt_tokens,
            self.completion_tokens + self.reserved_completion_tokens,
            self.window_requests,
            self.window_tokens,
            self.inflight,
        )

    def used(self, kind: LimitKind) -> int:
        return self.used_by_rank()[kind.rank]


def limit_of(limits: Limits, kind: LimitKind) -> int | None:
    return limits.by_rank[kind.rank]


def requested_by(estimate: Estimate, kind: LimitKind) -> int:
    return estimate.requested()[kind.rank]


def admits(used: int, requested: int, limit: int) -> bool:
    """Rule 4."""
    return used < limit and used + requested <= limit


@dataclass(frozen=True, slots=True)
class Breach:
    """A limit the request would exceed. Amounts are micro-USD for ``BUDGET_USD``, else tokens or
    requests. ``retry_after_ms``: when a retry can first succeed (rates), None when no retry can
    (budgets; a request larger than the whole ``tpm``). ``resets_at``: when the limit resets (the
    period end for budgets, the window emptying for rates)."""

    subject: Subject
    kind: LimitKind
    limit: int
    used: int
    requested: int
    retry_after_ms: int | None = None
    resets_at: datetime | None = None


def decide(
    subject: Subject,
    counters: Counters,
    estimate: Estimate,
    limits: Limits,
    requested: tuple[int, ...] | None = None,
) -> Breach | None:
    """The first limit of ``limits`` (in :class:`LimitKind` order) that the request would exceed.
    ``requested`` is ``estimate.requested()``, passed in when the caller already has it."""
    used = counters.used_by_rank()
    asked = requested if requested is not None else estimate.requested()
    for rank, limit in enumerate(limits.by_rank):
        if limit is not None and not (used[rank] < limit and used[rank] + asked[rank] <= limit):
            return Breach(subject, KIND_BY_RANK[rank], limit, used[rank], asked[rank])
    return None


def first_breach(breaches: Sequence[Breach | None]) -> Breach | None:
    """Rule 5 across subjects: lowest rank wins, the earlier subject on a tie."""
    best: Breach | None = None
    for breach in breaches:
        if breach is not None and (best is None or breach.kind.rank < best.kind.rank):
            best = breach
    return best


def rate_retry_ms(
    entries: Sequence[tuple[int, int]], kind: LimitKind, limit: int, requested: int, now_ms: int
) -> int | None:
    """Milliseconds until a refused request could be admitted by the rate window, from the window's
    ``(admitted_at_ms, tokens)`` entries, oldest first; None if it never could (it alone exceeds the
    limit). Assumes no new admissions meanwhile, so it is the earliest moment, not a promise."""
    if kind is LimitKind.RPM:
        if limit <= 0:
            return None
        index = len(entries) - limit
        return max(entries[index][0] + WINDOW_MS - now_ms, 1) if index >= 0 else 1
    if requested > limit or limit <= 0:
        return None
    used = sum(tokens for _, tokens in entries)
    for at, tokens in entries:
        used -= tokens
        if admits(used, requested, limit):
            return max(at + WINDOW_MS - now_ms, 1)
    return 1


def soft_threshold(limit: int, ratio: Decimal) -> int:
    return int((limit * ratio).to_integral_value(ROUND_CEILING))


def soft_reached(counters: Counters, limits: Limits) -> list[LimitKind]:
    """Budget kinds whose use (settled + reserved) has reached ``soft_ratio`` of a non-zero limit."""
    if limits.soft_by_rank == _NO_SOFT:
        return []
    used = counters.used_by_rank()
    return [
        BUDGET_KINDS[rank]
        for rank, threshold in enumerate(limits.soft_by_rank)
        if threshold is not None and used[rank] >= threshold
    ]


_NO_SOFT = (None, None, None, None)
