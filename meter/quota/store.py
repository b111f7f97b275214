"""The port every quota store implements, and the values that cross it.

A store keeps, per subject: the budget counters of each period (settled spend and tokens, plus what
in-flight reservations hold), a *ledger* of the reservations in flight, and the rate window (the
admissions of the last 60 seconds with their tokens). Implementations: :mod:`meter.quota.memory` (one
process) and :mod:`meter.quota.redis_store` (shared by every replica).

Rule 1 (all or nothing): ``reserve`` checks every counter of every policy given and either reserves on
        all of them or changes nothing, in one atomic step across processes (a Redis script; for the
        in-memory store, code with no ``await`` inside).
Rule 2 (settle exactly once): ``settle`` replaces a reservation by the actual spend. Per subject it
        applies only if it removes the reservation from that subject's ledger, so a second settle of
        the same reservation changes nothing; retrying a settle is always safe.
Rule 3 (leases): a reservation whose process died is never settled. Its ledger entry carries a
        deadline (``lease``); once past, the next operation on the subject releases what it held
        (budget reservation, concurrency slot) and keeps a tombstone for a day, so a late settle
        (a stream that outlived the lease) still records its spend, once.
Rule 4 (periods): a reservation's spend goes to the period it was admitted in. Budget counters
        expire two days after their period ends; rate windows 61 s after their last admission.
Rule 5: stores raise :class:`StoreUnavailable` for any failure to reach their backend; the failure
        policy is the caller's (:mod:`meter.quota.admission`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from decimal import Decimal
from typing import Protocol

from meter.quota.decision import BUDGET_KINDS, Breach, Counters, LimitKind, limit_of
from meter.quota.periods import Period, period_window, to_ms
from meter.quota.policy import Limits, Policy, Subject
from meter.quota.responses import RateSnapshot, RateState, tighter
from meter.quota.spend import Estimate, Spend, from_micros

DEFAULT_LEASE_SECONDS = 900.0
TOMBSTONE_MS = 86_400_000  # how long a lease-expired reservation can still be settled
BUDGET_GRACE_MS = 2 * 86_400_000  # budget counters outlive their period by this much
CONCURRENCY_RETRY_MS = 1000  # retry hint for a concurrency refusal (we cannot know when one ends)


@dataclass(frozen=True, slots=True)
class Hold:
    """One subject's share of a reservation."""

    subject: Subject
    limits: Limits
    period_start: datetime
    period_end: datetime
    start_ms: int
    end_ms: int

    @property
    def windowed(self) -> bool:
        return self.limits.has_rates


class Periods:
    """``period_window`` of the current moment, computed again only when a period has ended (stores
    ask for it on every request)."""

    def __init__(self, tz: tzinfo) -> None:
        self.tz = tz
        self._current: dict[Period, tuple[int, int, datetime, datetime]] = {}

    def hold(self, policy: Policy, now: datetime, now_ms: int) -> Hold:
        period = policy.limits.budget_period
        hit = self._current.get(period)
        if hit is None or not hit[0] <= now_ms < hit[1]:
            start, end = period_window(period, now, self.tz)
            hit = self._current[period] = (to_ms(start), to_ms(end), start, end)
        return Hold(policy.subject, policy.limits, hit[2], hit[3], hit[0], hit[1])


@dataclass(frozen=True, slots=True)
class LimitUsage:
    """One limit of a subject (for ``meter quota status`` and the admin API). Amounts are USD for
    ``BUDGET_USD``, else tokens, requests, or requests in flight. ``used`` is settled use (window
    count for rates); ``reserved`` is what in-flight requests hold on top."""

    kind: LimitKind
    limit: Decimal | int
    used: Decimal | int
    reserved: Decimal | int = 0

    @property
    def ratio(self) -> float:
        total = self.used + self.reserved
        return float(total / self.limit) if self.limit else (1.0 if total else 0.0)


@dataclass(frozen=True, slots=True)
class SubjectState:
    """A subject's counters at one moment (after the operation that returned it). ``status`` reads
    them all; ``reserve`` and ``settle`` of the Redis store leave counters the subject has no limit
    on (in flight without ``max_concurrent``, the window without rpm/tpm, any window in a settle) at
    0 rather than spend a read on them."""

    subject: Subject
    limits: Limits
    period_start: datetime
    period_end: datetime
    counters: Counters
    window_reset_ms: int = 0  # until the rate window is empty

    @property
    def rates(self) -> RateSnapshot:
        c, limits = self.counters, self.limits
        requests = (
            RateState(limits.rpm, limits.rpm - c.window_requests, self.window_reset_ms)
            if limits.rpm is not None
            else None
        )
        tokens = (
            RateState(limits.tpm, limits.tpm - c.window_tokens, self.window_reset_ms)
            if limits.tpm is not None
            else None
        )
        return RateSnapshot(requests, tokens)

    @property
    def spent_usd(self) -> Decimal:
        return from_micros(self.counters.spent_micros)

    @property
    def reserved_usd(self) -> Decimal:
        return from_micros(self.counters.reserved_micros)

    def usage(self) -> list[LimitUsage]:
        """Every limit set on the subject with its current use."""
        c, out = self.counters, []
        reserved = {
            LimitKind.BUDGET_TOKENS: c.reserved_prompt_tokens + c.reserved_completion_tokens,
            LimitKind.BUDGET_PROMPT_TOKENS: c.reserved_prompt_tokens,
            LimitKind.BUDGET_COMPLETION_TOKENS: c.reserved_completion_tokens,
        }
        for kind in LimitKind:
            limit = limit_of(self.limits, kind)
            if limit is None:
                continue
            if kind is LimitKind.BUDGET_USD:
                out.append(LimitUsage(kind, from_micros(limit), self.spent_usd, self.reserved_usd))
            elif kind in BUDGET_KINDS:
                out.append(LimitUsage(kind, limit, c.used(kind) - reserved[kind], reserved[kind]))
            else:
                out.append(LimitUsage(kind, limit, c.used(kind)))
        return out


def combined_rates(states: Sequence[SubjectState]) -> RateSnapshot | None:
    """The most constraining rate state across subjects (responses Rule 4); None without rate limits."""
    requests = tokens = None
    for state in states:
        if state.limits.has_rates:
            snapshot = state.rates
            requests = tighter(requests, snapshot.requests)
            tokens = tighter(tokens, snapshot.tokens)
    return None if requests is None and tokens is None else RateSnapshot(requests, tokens)


@dataclass(frozen=True, slots=True)
class Reservation:
    """An admitted request's claim, handed back to ``settle``. ``degraded``: admitted without the
    store (fail-open); settling it is a no-op."""

    id: str
    estimate: Estimate
    holds: tuple[Hold, ...]
    admitted_ms: int
    states: tuple[SubjectState, ...] = ()
    soft_crossings: tuple[tuple[Subject, LimitKind], ...] = ()
    degraded: bool = False
    team: str = ""  # the request's team, for metric labels (set by admission)

    @property
    def rates(self) -> RateSnapshot | None:
        return combined_rates(self.states)


@dataclass(frozen=True, slots=True)
class Refusal:
    """``reserve`` changed nothing: ``breach`` is the limit reported (decision Rule 3)."""

    breach: Breach
    states: tuple[SubjectState, ...] = ()

    @property
    def rates(self) -> RateSnapshot | None:
        return combined_rates(self.states)


@dataclass(frozen=True, slots=True)
class Settlement:
    """``applied[i]``: whether holds[i] was settled now (False: already settled, or its tombstone is
    gone). ``late[i]``: settled after its lease had expired."""

    applied: tuple[bool, ...]
    late: tuple[bool, ...]
    states: tuple[SubjectState, ...] = ()
    soft_crossings: tuple[tuple[Subject, LimitKind], ...] = ()


class QuotaStore(Protocol):
    name: str  # "memory" or "redis": the ``store`` label of the fallback metric
    tz: tzinfo  # the time zone budget periods are aligned to
    # True when a call takes its place in the store's order before its first ``await`` gives the
    # loop away (the in-memory store applies it there; the Redis store queues it on its one
    # connection): a settle task started before a later request's admit is then applied before it.
    ordered: bool

    async def reserve(
        self, policies: Sequence[Policy], estimate: Estimate, now: datetime
    ) -> Reservation | Refusal: ...

    async def settle(self, reservation: Reservation, spend: Spend, now: datetime) -> Settlement: ...

    async def status(self, policies: Sequence[Policy], now: datetime) -> tuple[SubjectState, ...]: ...

    async def seed_spent(
        self, subject: Subject, period: Period, period_start: datetime, spend: Spend, now: datetime
    ) -> bool:
        """Set the settled totals of ``subject``'s period starting at ``period_start`` (from the
        database's rollups) unless that counter already exists; True if it was set."""
        ...

    async def aclose(self) -> None: ...
