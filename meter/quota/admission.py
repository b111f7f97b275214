"""Quota admission for the forward path: reserve before forwarding, settle when the response ends.

    result = await admission.admit(team, key_fp, info, now, endpoint=path)
    if not result.allowed: send result.rejection (status, headers, body) and stop
    add result.headers to the response; forward; in the stream's ``finally``:
    await admission.settle(result.reservation, usage_or_None, cost_or_None, now)

``settle`` must run also when the request's task is being cancelled (the client left): await it after
``task.uncancel()`` or under ``asyncio.shield``, or the reservation stays held until its lease expires.
The forward path uses ``start_settle`` instead, which runs ``settle`` as a task it can start before the
response's last byte and await after it, taking the store's round trip off the client's latency.

Rule 1 (cheap when unlimited): a request whose team and key have no policy costs one lookup call and
        no store round trip; ``admit`` returns the shared :data:`UNLIMITED` result.
Rule 2 (bound): with conservative estimates the recorded spend never exceeds a budget. When a response
        costs more than it reserved, the budget overshoots by at most the sum of (actual - reserved)
        over the requests in flight when the last one was admitted; the excess is counted in
        ``meter_quota_overshoot_usd_total`` and, once spend reaches the budget, every further request
        is refused. Rate windows obey the same bound for ``tpm``.

Failure policy (the store is unreachable, e.g. Redis down or slower than its timeout):

* budgets (USD and token budgets) fail **closed** by default (``budget_failure="closed"``): a request
  subject to any budget is refused with ``503`` ``quota_unavailable`` and ``retry-after: 1``, not a
  429, because the client's quota is not the problem and the openai SDK retries 5xx with backoff;
* rate limits (rpm, tpm, concurrency) fail **open** by default (``rate_failure="open"``);
* a request is refused if any limit that applies to it fails closed, otherwise admitted without a
  reservation (its settle is a no-op; its spend is recorded by the journal/database as always, but not
  in the store's counters);
* every fallback is counted in ``meter_quota_fallbacks_total{store, policy="open"|"closed"}``;
* after an error the store is left alone for ``retry_store_after`` seconds (the failure policy applies
  at once instead of every request waiting for a timeout);
* a settle that fails is kept (at most ``max_pending_settles``, then dropped) and retried after the
  next settle that succeeds; settles are idempotent, so a retry cannot double-count. Failures are
  counted in ``meter_quota_store_errors_total{store, op}``.

Metrics (``team`` is the request's team, ``unassigned``, or ``other`` past ``max_team_labels``; no key
label ever): ``meter_quota_rejections_total{team, reason}``, ``meter_budget_remaining_usd{team}``,
``meter_budget_used_ratio{team}``, ``meter_team_budget_usd{team, period}``,
``meter_team_spend_usd{team, period}``, ``meter_quota_overshoot_usd_total{team}``,
``meter_ratelimit_remaining{team, kind}``, ``meter_quota_soft_limit_total{team, scope, limit}``,
``meter_quota_fallbacks_total{store, policy}``, ``meter_quota_store_errors_total{store, op}``. Gauges
describe the team's own policy as this replica last saw it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

from meter.errors import StoreUnavailable
from meter.quota.decision import LimitKind
from meter.quota.periods import period_window, to_ms
from meter.quota.policy import Limits, Policy, Subject
from meter.quota.responses import Headers, Rejection, ratelimit_headers, reject, unavailable
from meter.quota.spend import Estimate, PriceFn, Spend, actual_spend, estimate, from_micros
from meter.quota.store import QuotaStore, Refusal, Reservation, SubjectState
from meter.records import Usage, new_event_id
from meter.sinks.prometheus import UNASSIGNED, LabelBudget
from meter.tap.request import RequestInfo

log = logging.getLogger("meter.quota")

PolicyLookup = Callable[[str, str | None], tuple[Limits | None, Limits | None]]
"""``(team, key fingerprint) -> (team limits, key limits)``; must be fast and not block (a cache)."""

FailurePolicy = Literal["open", "closed"]


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    default_max_tokens: int = 4096  # reserved output when a request sets no max_tokens
    budget_failure: FailurePolicy = "closed"
    rate_failure: FailurePolicy = "open"
    retry_store_after: float = 1.0  # seconds without store calls after a store error
    max_pending_settles: int = 10_000
    max_team_labels: int = 1000

    def __post_init__(self) -> None:
        for name in ("budget_failure", "rate_failure"):
            if getattr(self, name) not in ("open", "closed"):
                raise ValueError(f"{name} must be 'open' or 'closed'")
        if self.default_max_tokens < 0:
            raise ValueError("default_max_tokens must not be negative")


@dataclass(frozen=True, slots=True)
class AdmissionResult:
    """``allowed``: forward, adding ``headers`` to the response and settling ``reservation`` (None when
    no limit applies). Otherwise send ``rejection`` as it is."""

    allowed: bool
    reservation: Reservation | None = None
    headers: Headers | None = None
    rejection: Rejection | None = None


UNLIMITED = AdmissionResult(True)


class QuotaMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejections = Counter(
            "meter_quota_rejections",
            "Requests refused by quota admission, by team and reason (the limit, or store_unavailable).",
            ["team", "reason"],
            registry=registry,
        )
        self.budget_remaining = Gauge(
            "meter_budget_remaining_usd",
            "Team USD budget left in the current period (budget - spent - reserved; negative = overshoot).",
            ["team"],
            registry=registry,
            multiprocess_mode="mostrecent",  # workers share one store: the latest view wins
        )
        self.budget_used = Gauge(
            "meter_budget_used_ratio",
            "Share of the team's USD budget spent or reserved in the current period.",
            ["team"],
            registry=registry,
            multiprocess_mode="mostrecent",  # workers share one store: the latest view wins
        )
        self.team_budget = Gauge(
            "meter_team_budget_usd",
            "Team USD budget of the current period (dashboards and alert rules divide spend by it).",
            ["team", "period"],
            registry=registry,
            multiprocess_mode="mostrecent",  # workers share one store: the latest view wins
        )
        self.team_spend = Gauge(
            "meter_team_spend_usd",
            "Team USD spend settled in the current period, as last seen by this replica.",
            ["team", "period"],
            registry=registry,
            multiprocess_mode="mostrecent",  # workers share one store: the latest view wins
        )
        self.overshoot = Counter(
            "meter_quota_overshoot_usd",
            "USD by which settled requests cost more than they reserved.",
            ["team"],
            registry=registry,
        )
        self.ratelimit_remaining = Gauge(
            "meter_ratelimit_remaining",
            "Team rate-limit headroom after the last admission (kind: requests, tokens, concurrency).",
            ["team", "kind"],
            registry=registry,
            multiprocess_mode="mostrecent",  # workers share one store: the latest view wins
        )
        self.soft = Counter(
            "meter_quota_soft_limit",
            "Budgets that reached their soft threshold (once per period and limit).",
            ["team", "scope", "limit"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "meter_quota_fallbacks",
            "Admissions decided by the failure policy because the quota store was unavailable.",
            ["store", "policy"],
            registry=registry,
        )
        self.store_errors = Counter(
            "meter_quota_store_errors",
            "Quota store operations that failed (op: reserve, settle, settle_dropped).",
            ["store", "op"],
            registry=registry,
        )


class _TeamChildren:
    """The labelled children of one team (``labels()`` costs microseconds; admission runs often)."""

    __slots__ = (
        "budget",
        "budget_remaining",
        "budget_used",
        "concurrency",
        "overshoot",
        "period",
        "requests",
        "spend",
        "tokens",
    )

    def __init__(self, metrics: QuotaMetrics, team: str) -> None:
        self.period: str | None = None  # of the budget/spend children below
        self.budget: Gauge | None = None
        self.spend: Gauge | None = None
        self.budget_remaining = metrics.budget_remaining.labels(team)
        self.budget_used = metrics.budget_used.labels(team)
        self.overshoot = metrics.overshoot.labels(team)
        self.requests = metrics.ratelimit_remaining.labels(team, "requests")
        self.tokens = metrics.ratelimit_remaining.labels(team, "tokens")
        self.concurrency = metrics.ratelimit_remaining.labels(team, "concurrency")


def _has_budget(limits: Limits) -> bool:
    return (
        limits.budget_usd is not None
        or limits.tokens_budget is not None
        or limits.prompt_tokens_budget is not None
        or limits.completion_tokens_budget is not None
    )


def _has_rate(limits: Limits) -> bool:
    return limits.rpm is not None or limits.tpm is not None or limits.max_concurrent is not None


class Admission:
    def __init__(
        self,
        store: QuotaStore,
        policies: PolicyLookup,
        price: PriceFn,
        *,
        registry: CollectorRegistry,
        config: AdmissionConfig | None = None,
    ) -> None:
        self.store = store
        self.ordered = store.ordered
        self.config = config or AdmissionConfig()
        self.metrics = QuotaMetrics(registry)
        self._policies = policies
        self._price = price
        self._team_label = LabelBudget(self.config.max_team_labels)
        self._children: dict[str, _TeamChildren] = {}
        self._down_until: datetime | None = None
        self._pending: deque[tuple[Reservation, Spend]] = deque()
        self._settling: set[asyncio.Task[Spend | None]] = set()  # strong references while running

    # -- the forward path -----------------------------------------------------------------------------

    async def admit(
        self, team: str, key_fp: str | None, info: RequestInfo, now: datetime, *, endpoint: str | None = None
    ) -> AdmissionResult:
        policies = self._applicable(team, key_fp)
        if not policies:
            return UNLIMITED
        est = estimate(info, self._price(info.model), self.config.default_max_tokens, endpoint=endpoint)
        if self._store_down(now):
            return self._fallback(team, policies, est, now)
        try:
            outcome = await self.store.reserve(policies, est, now)
        except StoreUnavailable as exc:
            self._trip(now, "reserve", exc)
            return self._fallback(team, policies, est, now)
        label = self._label(team)
        self._observe(label, outcome.states, rates=True)
        if isinstance(outcome, Refusal):
            period = next(
                (p.limits.budget_period for p in policies if p.subject == outcome.breach.subject), None
            )
            rejection = reject(outcome.breach, outcome.rates, period)
            self.metrics.rejections.labels(label, rejection.reason).inc()
            return AdmissionResult(False, None, rejection.headers, rejection)
        self._soft(label, outcome.soft_crossings, outcome.states)
        return AdmissionResult(True, replace(outcome, team=team), ratelimit_headers(outcome.rates))

    async def settle(
        self, reservation: Reservation, usage: Usage | None, cost: Decimal | None, now: datetime
    ) -> Spend | None:
        """Replace the reservation by the actual spend (see :func:`~meter.quota.spend.actual_spend`
        for ``usage`` None and missing fields). Never raises for store failures. Returns the spend
        settled (None for a degraded reservation)."""
        if reservation.degraded:
            return None
        est = reservation.estimate
        spend = actual_spend(est, usage, cost, self._price(est.model) if cost is None else None)
        if not await self._settle(reservation, spend, now):
            self._defer(reservation, spend)
            return spend
        while self._pending and not self._store_down(now):
            pending, pending_spend = self._pending.popleft()
            if not await self._settle(pending, pending_spend, now):
                self._pending.appendleft((pending, pending_spend))
                break
        return spend

    def start_settle(
        self, reservation: Reservation, usage: Usage | None, cost: Decimal | None, now: datetime
    ) -> asyncio.Task[Spend | None]:
        """``settle`` as a task that runs to completion whoever awaits it or not (shield it when
        awaiting from a task that may be cancelled)."""
        task = asyncio.ensure_future(self.settle(reservation, usage, cost, now))
        self._settling.add(task)
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task[Spend | None]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("quota settle failed", exc_info=task.exception())

    # -- operator views -------------------------------------------------------------------------------

    async def status(self, team: str | None, key_fp: str | None, now: datetime) -> tuple[SubjectState, ...]:
        """Usage against every limit of the given team and/or key (``meter quota status``). Raises
        StoreUnavailable."""
        team_limits, key_limits = self._policies(team or "", key_fp)
        policies = []
        if team and team_limits is not None:
            policies.append(Policy(Subject("team", team), team_limits))
        if key_fp and key_limits is not None:
            policies.append(Policy(Subject("key", key_fp), key_limits))
        return await self.store.status(policies, now) if policies else ()

    async def refresh_gauges(self, teams: list[tuple[str, Limits]], now: datetime) -> None:
        """Set the team gauges from the store's current counters. Admissions and settles set them as
        they go, but replies from a shared store can arrive out of order, and a quiet team would keep
        the last one seen; the runtime calls this every few seconds. Raises StoreUnavailable."""
        policies = [Policy(Subject("team", team), limits) for team, limits in teams if not limits.is_empty]
        if not policies:
            return
        for state in await self.store.status(policies, now):
            self._observe(self._label(state.subject.name), (state,), rates=False)

    def period_of(self, limits: Limits, now: datetime) -> tuple[datetime, datetime]:
        """The budget period of ``limits`` containing ``now`` (what to sum from the rollups to seed)."""
        return period_window(limits.budget_period, now, self.store.tz)

    async def seed(self, subject: Subject, limits: Limits, spend: Spend, now: datetime) -> bool:
        """Rebuild ``subject``'s current-period counters from the database's rollups (the spend of
        :meth:`period_of`) unless the store already has them. Call at start, before admitting, and
        when a budget is set on a subject. Raises StoreUnavailable."""
        start, _ = self.period_of(limits, now)
        return await self.store.seed_spent(subject, limits.budget_period, start, spend, now)

    # -- internals ------------------------------------------------------------------------------------

    def _applicable(self, team: str, key_fp: str | None) -> list[Policy]:
        team_limits, key_limits = self._policies(team, key_fp)
        if team_limits is None and key_limits is None:
            return []
        policies = []
        if team_limits is not None and not team_limits.is_empty:
            policies.append(Policy(Subject("team", team), team_limits))
        if key_fp is not None and key_limits is not None and not key_limits.is_empty:
            policies.append(Policy(Subject("key", key_fp), key_limits))
        return policies

    def _label(self, team: str) -> str:
        return self._team_label(team) if team else UNASSIGNED

    def _store_down(self, now: datetime) -> bool:
        return self._down_until is not None and now < self._down_until

    def _trip(self, now: datetime, op: str, exc: StoreUnavailable) -> None:
        self.metrics.store_errors.labels(self.store.name, op).inc()
        if not self._store_down(now):  # warn once, when it goes down
            if exc.timed_out:
                # The wait includes the event loop's: a process out of CPU reads a healthy store's
                # replies late too, which an operator should not chase in Redis.
                log.warning(
                    "quota store %s did not answer in time (%r); applying the failure policy for %gs. "
                    "A saturated meter process reads replies late too: check its CPU before the store",
                    self.store.name,
                    exc.cause,
                    self.config.retry_store_after,
                )
            else:
                log.warning(
                    "quota store %s unavailable (%s); applying the failure policy", self.store.name, exc.cause
                )
        self._down_until = now + timedelta(seconds=self.config.retry_store_after)

    def _fallback(self, team: str, policies: list[Policy], est: Estimate, now: datetime) -> AdmissionResult:
        closed = next(
            (
                p
                for p in policies
                if (self.config.budget_failure == "closed" and _has_budget(p.limits))
                or (self.config.rate_failure == "closed" and _has_rate(p.limits))
            ),
            None,
        )
        self.metrics.fallbacks.labels(self.store.name, "closed" if closed else "open").inc()
        if closed is not None:
            rejection = unavailable(closed.subject)
            self.metrics.rejections.labels(self._label(team), rejection.reason).inc()
            return AdmissionResult(False, None, rejection.headers, rejection)
        degraded = Reservation(new_event_id(), est, (), to_ms(now), degraded=True, team=team)
        return AdmissionResult(True, degraded, [])

    async def _settle(self, reservation: Reservation, spend: Spend, now: datetime) -> bool:
        if self._store_down(now):
            return False
        try:
            result = await self.store.settle(reservation, spend, now)
        except StoreUnavailable as exc:
            self._trip(now, "settle", exc)
            return False
        label = self._label(reservation.team)
        excess = spend.cost_micros - reservation.estimate.cost_micros
        if excess > 0 and any(result.applied):
            self._team(label).overshoot.inc(float(from_micros(excess)))
        self._observe(label, result.states, rates=False)
        self._soft(label, result.soft_crossings, result.states)
        return True

    def _defer(self, reservation: Reservation, spend: Spend) -> None:
        if len(self._pending) >= self.config.max_pending_settles:
            self.metrics.store_errors.labels(self.store.name, "settle_dropped").inc()
            return
        self._pending.append((reservation, spend))

    def _team(self, label: str) -> _TeamChildren:
        children = self._children.get(label)
        if children is None:
            children = self._children[label] = _TeamChildren(self.metrics, label)
        return children

    def _observe(self, label: str, states: tuple[SubjectState, ...], *, rates: bool) -> None:
        """Gauges of the team's own policy (``rates``: the states carry the rate windows, which
        settle's do not)."""
        for state in states:
            if state.subject.kind != "team":
                continue
            limits, c = state.limits, state.counters
            children = self._team(label)
            budget = limits.budget_micros
            if budget is not None:
                used = c.spent_micros + c.reserved_micros
                children.budget_remaining.set((budget - used) / 1_000_000)
                children.budget_used.set(used / budget if budget else 1.0)
                if children.period != limits.budget_period or children.budget is None:
                    children.period = limits.budget_period
                    children.budget = self.metrics.team_budget.labels(label, limits.budget_period)
                    children.spend = self.metrics.team_spend.labels(label, limits.budget_period)
                children.budget.set(budget / 1_000_000)
                if children.spend is not None:
                    children.spend.set(c.spent_micros / 1_000_000)
            if limits.max_concurrent is not None:
                children.concurrency.set(limits.max_concurrent - c.inflight)
            if rates:
                if limits.rpm is not None:
                    children.requests.set(limits.rpm - c.window_requests)
                if limits.tpm is not None:
                    children.tokens.set(limits.tpm - c.window_tokens)

    def _soft(
        self,
        label: str,
        crossings: tuple[tuple[Subject, LimitKind], ...],
        states: tuple[SubjectState, ...],
    ) -> None:
        for subject, kind in crossings:
            self.metrics.soft.labels(label, subject.kind, kind.value).inc()
            state = next((s for s in states if s.subject == subject), None)
            usage = next((u for u in state.usage() if u.kind is kind), None) if state else None
            log.warning(
                "quota soft limit reached: %s %s at %s of %s (soft ratio %s)",
                subject.id,
                kind.value,
                None if usage is None else usage.used + usage.reserved,
                None if usage is None else usage.limit,
                None if state is None else state.limits.soft_ratio,
            )
