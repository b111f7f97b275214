"""The in-process quota store: one process, one asyncio event loop.

Atomicity (store Rule 1) comes from the event loop: ``reserve``, ``settle``, ``status`` and
``seed_spent`` run to completion without an ``await``, so no other task can interleave. Limits held
here are per process: with several workers or replicas, use the Redis store.

The semantics (ledger, leases, tombstones, windows, expiry) are those of :mod:`meter.quota.store`,
implemented with the pure functions of :mod:`meter.quota.decision` and :mod:`meter.quota.periods`; the
contract tests run the same cases against this store and the Redis one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, tzinfo

from meter.quota.decision import (
    WINDOW_MS,
    Breach,
    Counters,
    LimitKind,
    decide,
    first_breach,
    rate_retry_ms,
    soft_reached,
)
from meter.quota.periods import Period, from_ms, period_window, to_ms
from meter.quota.policy import Policy, Subject
from meter.quota.spend import Estimate, Spend
from meter.quota.store import (
    BUDGET_GRACE_MS,
    CONCURRENCY_RETRY_MS,
    DEFAULT_LEASE_SECONDS,
    TOMBSTONE_MS,
    Hold,
    Periods,
    Refusal,
    Reservation,
    Settlement,
    SubjectState,
)
from meter.records import new_event_id


@dataclass(slots=True)
class _Budget:
    end_ms: int
    spent: int = 0
    tokens: int = 0
    prompt: int = 0
    completion: int = 0
    reserved: int = 0
    reserved_prompt: int = 0
    reserved_completion: int = 0
    exists: bool = False  # settled totals written (by a settle or a seed)
    soft: set[LimitKind] = field(default_factory=set)


@dataclass(slots=True)
class _Held:
    deadline_ms: int
    period_start: int  # ms
    usd: int
    prompt: int
    completion: int


@dataclass(slots=True)
class _Subject:
    budgets: dict[int, _Budget] = field(default_factory=dict)  # period start (ms) -> counters
    ledger: dict[str, _Held] = field(default_factory=dict)  # in deadline order (leases are equal)
    tombstones: dict[str, tuple[int, _Held]] = field(default_factory=dict)  # id -> (drop at, held)
    window: dict[str, list[int]] = field(default_factory=dict)  # id -> [admitted ms, tokens], oldest first
    window_tokens: int = 0


class MemoryStore:
    name = "memory"
    ordered = True  # every call runs to completion without an await (see above)

    def __init__(self, *, tz: tzinfo = UTC, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.tz = tz
        self._periods = Periods(tz)
        self._lease_ms = int(lease_seconds * 1000)
        self._subjects: dict[str, _Subject] = {}

    # -- the port -------------------------------------------------------------------------------------

    async def reserve(
        self, policies: Sequence[Policy], estimate: Estimate, now: datetime
    ) -> Reservation | Refusal:
        now_ms = to_ms(now)
        holds = [self._periods.hold(policy, now, now_ms) for policy in policies]
        subjects = [self._prune(self._subject(h.subject), now_ms) for h in holds]
        budgets = [self._budget(s, h) for s, h in zip(subjects, holds, strict=True)]
        before = [_counters(b, s) for b, s in zip(budgets, subjects, strict=True)]
        asked = estimate.requested()
        breach = first_breach(
            [decide(h.subject, c, estimate, h.limits, asked) for h, c in zip(holds, before, strict=True)]
        )
        if breach is not None:
            i = next(i for i, h in enumerate(holds) if h.subject == breach.subject)
            breach = _explain(breach, holds[i], subjects[i], now_ms)
            refused = [_state(h, c, s, now_ms) for h, c, s in zip(holds, before, subjects, strict=True)]
            return Refusal(breach, tuple(refused))

        rid = new_event_id()
        crossings: list[tuple[Subject, LimitKind]] = []
        states: list[SubjectState] = []
        for hold, subject, budget in zip(holds, subjects, budgets, strict=True):
            budget.reserved += estimate.cost_micros
            budget.reserved_prompt += estimate.prompt_tokens
            budget.reserved_completion += estimate.completion_tokens
            subject.ledger[rid] = _Held(
                now_ms + self._lease_ms,
                hold.start_ms,
                estimate.cost_micros,
                estimate.prompt_tokens,
                estimate.completion_tokens,
            )
            if hold.windowed:
                subject.window[rid] = [now_ms, estimate.total_tokens]
                subject.window_tokens += estimate.total_tokens
            counters = _counters(budget, subject)
            crossings += [(hold.subject, kind) for kind in _new_soft(budget, counters, hold)]
            states.append(_state(hold, counters, subject, now_ms))
        return Reservation(rid, estimate, tuple(holds), now_ms, tuple(states), tuple(crossings))

    async def settle(self, reservation: Reservation, spend: Spend, now: datetime) -> Settlement:
        now_ms = to_ms(now)
        applied: list[bool] = []
        late: list[bool] = []
        states: list[SubjectState] = []
        crossings: list[tuple[Subject, LimitKind]] = []
        rid = reservation.id
        for hold in reservation.holds:
            subject = self._prune(self._subject(hold.subject), now_ms)
            budget = self._budget(subject, hold)
            held = subject.ledger.pop(rid, None)
            was_late = False
            if held is not None:  # (clamped: the counters may have expired under a very late settle)
                budget.reserved = max(budget.reserved - held.usd, 0)
                budget.reserved_prompt = max(budget.reserved_prompt - held.prompt, 0)
                budget.reserved_completion = max(budget.reserved_completion - held.completion, 0)
            else:
                tomb = subject.tombstones.pop(rid, None)
                was_late = tomb is not None
            if held is not None or was_late:
                budget.spent += spend.cost_micros
                budget.tokens += spend.total_tokens
                budget.prompt += spend.prompt_tokens
                budget.completion += spend.completion_tokens
                budget.exists = True
                entry = subject.window.get(rid)
                if entry is not None:
                    subject.window_tokens += spend.total_tokens - entry[1]
                    entry[1] = spend.total_tokens
            applied.append(held is not None or was_late)
            late.append(was_late)
            counters = _counters(budget, subject)
            crossings += [(hold.subject, kind) for kind in _new_soft(budget, counters, hold)]
            states.append(_state(hold, counters, subject, now_ms))
        return Settlement(tuple(applied), tuple(late), tuple(states), tuple(crossings))

    async def status(self, policies: Sequence[Policy], now: datetime) -> tuple[SubjectState, ...]:
        now_ms = to_ms(now)
        out = []
        for policy in policies:
            hold = self._periods.hold(policy, now, now_ms)
            subject = self._prune(self._subject(hold.subject), now_ms)
            budget = subject.budgets.get(hold.start_ms) or _Budget(hold.end_ms)
            out.append(_state(hold, _counters(budget, subject), subject, now_ms))
        return tuple(out)

    async def seed_spent(
        self, subject: Subject, period: Period, period_start: datetime, spend: Spend, now: datetime
    ) -> bool:
        start, end = period_window(period, period_start, self.tz)
        data = self._subject(subject)
        budget = data.budgets.setdefault(to_ms(start), _Budget(to_ms(end)))
        if budget.exists:
            return False
        budget.spent += spend.cost_micros
        budget.tokens += spend.total_tokens
        budget.prompt += spend.prompt_tokens
        budget.completion += spend.completion_tokens
        budget.exists = True
        return True

    async def aclose(self) -> None:
        self._subjects.clear()

    # -- internals ------------------------------------------------------------------------------------

    def _subject(self, subject: Subject) -> _Subject:
        data = self._subjects.get(subject.id)
        if data is None:
            data = self._subjects[subject.id] = _Subject()
        return data

    def _budget(self, subject: _Subject, hold: Hold) -> _Budget:
        budget = subject.budgets.get(hold.start_ms)
        if budget is None:
            budget = subject.budgets[hold.start_ms] = _Budget(hold.end_ms)
        return budget

    def _prune(self, s: _Subject, now_ms: int) -> _Subject:
        """Leases past their deadline release what they held (store Rule 3); the window drops
        admissions older than 60 s; counters of long-gone periods are dropped."""
        while s.ledger:
            rid, held = next(iter(s.ledger.items()))
            if held.deadline_ms > now_ms:
                break
            del s.ledger[rid]
            budget = s.budgets.get(held.period_start)
            if budget is not None:
                budget.reserved -= held.usd
                budget.reserved_prompt -= held.prompt
                budget.reserved_completion -= held.completion
            s.tombstones[rid] = (now_ms + TOMBSTONE_MS, held)
        if s.tombstones:
            for rid in [r for r, (drop, _) in s.tombstones.items() if drop <= now_ms]:
                del s.tombstones[rid]
        cutoff = now_ms - WINDOW_MS
        while s.window:
            rid, (at, tokens) = next(iter(s.window.items()))
            if at > cutoff:
                break
            del s.window[rid]
            s.window_tokens -= tokens
        if not s.window:
            s.window_tokens = 0
        for start in [k for k, b in s.budgets.items() if b.end_ms + BUDGET_GRACE_MS <= now_ms]:
            del s.budgets[start]
        return s


def _counters(b: _Budget, s: _Subject) -> Counters:
    return Counters(
        spent_micros=b.spent,
        reserved_micros=b.reserved,
        tokens=b.tokens,
        prompt_tokens=b.prompt,
        completion_tokens=b.completion,
        reserved_prompt_tokens=b.reserved_prompt,
        reserved_completion_tokens=b.reserved_completion,
        window_requests=len(s.window),
        window_tokens=s.window_tokens,
        inflight=len(s.ledger),
    )


def _window_reset_ms(s: _Subject, now_ms: int) -> int:
    if not s.window:
        return 0
    newest = next(reversed(s.window.values()))[0]
    return max(newest + WINDOW_MS - now_ms, 0)


def _state(hold: Hold, counters: Counters, s: _Subject, now_ms: int) -> SubjectState:
    reset = _window_reset_ms(s, now_ms) if hold.windowed else 0
    return SubjectState(hold.subject, hold.limits, hold.period_start, hold.period_end, counters, reset)


def _new_soft(budget: _Budget, counters: Counters, hold: Hold) -> list[LimitKind]:
    new = [kind for kind in soft_reached(counters, hold.limits) if kind not in budget.soft]
    budget.soft.update(new)
    return new


def _explain(breach: Breach, hold: Hold, s: _Subject, now_ms: int) -> Breach:
    """Fill in when the refused request could pass and when the limit resets."""
    if breach.kind.is_budget:
        return replace(breach, resets_at=hold.period_end)
    reset = _window_reset_ms(s, now_ms)
    if breach.kind is LimitKind.CONCURRENCY:
        return replace(breach, retry_after_ms=CONCURRENCY_RETRY_MS)
    entries = [(at, tokens) for at, tokens in s.window.values()]
    retry = rate_retry_ms(entries, breach.kind, breach.limit, breach.requested, now_ms)
    return replace(breach, retry_after_ms=retry, resets_at=from_ms(now_ms + reset))
