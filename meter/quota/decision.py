"""Whether a request fits its policies: counters against limits, and the breach reported.

:func:`decide` checks one subject's :class:`Counters` plus the request's
:class:`~meter.quota.spend.Estimate` against its :class:`~meter.quota.policy.Limits`;
:func:`first_breach` picks the one reported across subjects; :func:`rate_retry_ms` says when a refused
request could first be admitted by a rate window; :func:`soft_reached` finds the soft thresholds crossed.

Rule 1 (rate windows are exact sliding windows): a request counts towards ``rpm`` and its tokens
        towards ``tpm`` at its admission time ``t`` (millisecond resolution) until ``t + 60 s``. A
        request is admitted only if, counting it, the admissions in ``(t - 60 s, t]`` stay within the
        limit, so *every* 60-second interval holds at most ``rpm`` admitted requests and at most ``tpm``
        tokens as reserved (a later settle replaces the reservation by the actual tokens; only the
        excess of actual over reserved can exceed ``tpm``, as for budgets).
Rule 2 (one refusal rule): a counter with ``used`` of ``limit`` admits a request asking ``requested``
        iff ``used < limit`` and ``used + requested <= limit``. The first part refuses requests once a
        limit is reached even when they reserve nothing (an unpriced model against a USD budget).
Rule 3 (which limit is reported): limits are checked in :class:`LimitKind` order (budgets before
        rates, the USD budget first); across subjects the lowest-ranked breach wins, the earlier
        subject on a tie. The Redis script follows the same rules; the contract tests hold both to it.

This module is pure: it imports nothing from redis, litestar, httpx or SQLAlchemy.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from meter.quota.policy import Limits, Subject
from meter.quota.spend import Estimate

WINDOW_MS = 60_000  # the rpm/tpm window


class LimitKind(enum.StrEnum):
    """In check order (Rule 3). The value is the ``reason`` label of the rejection metric."""

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
    """Rule 2."""
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
    """Rule 3 across subjects: lowest rank wins, the earlier subject on a tie."""
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
