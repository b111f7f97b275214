"""Contract suite for quota stores: every case runs against the in-memory store and the Redis store.

Redis is the machine's (127.0.0.1:6379); each test uses its own key prefix and deletes its keys. A
missing Redis fails these tests, it does not skip them. Time is a fake clock (``now`` arguments).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from meter.quota.decision import LimitKind
from meter.quota.policy import Limits, Policy, Subject
from meter.quota.spend import Estimate, Spend
from meter.quota.store import CONCURRENCY_RETRY_MS, QuotaStore, Refusal, Reservation
from tests.support.quota import EST, EST_MICROS, T0, TEAM, StoreFactory, usd

KEY = Subject("key", "f" * 64)


@pytest.fixture
def store(make_store: StoreFactory) -> QuotaStore:
    return make_store()


def policy(subject: Subject = TEAM, **limits: Any) -> Policy:
    return Policy(subject, Limits(**limits))


async def status_of(store: QuotaStore, p: Policy, now: datetime = T0) -> Any:
    (state,) = await store.status([p], now)
    return state


def admitted(outcome: Reservation | Refusal) -> Reservation:
    assert isinstance(outcome, Reservation), outcome
    return outcome


def refused(outcome: Reservation | Refusal) -> Refusal:
    assert isinstance(outcome, Refusal), outcome
    return outcome


# --- reserve and settle -------------------------------------------------------------------------------


async def test_reserve_then_settle_replaces_the_reservation(store: QuotaStore) -> None:
    p = policy(budget_usd=Decimal("1"), max_concurrent=5)
    r = admitted(await store.reserve([p], EST, T0))
    state = await status_of(store, p)
    c = state.counters
    assert (c.spent_micros, c.reserved_micros, c.inflight) == (0, 500, 1)
    assert (state.counters.reserved_prompt_tokens, state.counters.reserved_completion_tokens) == (100, 200)

    result = await store.settle(r, Spend(90, 10, 100, Decimal("0.000123")), T0 + timedelta(seconds=1))
    assert result.applied == (True,) and result.late == (False,)
    state = await status_of(store, p)
    c = state.counters
    assert (c.spent_micros, c.reserved_micros, c.inflight) == (123, 0, 0)
    assert (c.tokens, c.prompt_tokens, c.completion_tokens) == (100, 90, 10)
    assert (c.reserved_prompt_tokens, c.reserved_completion_tokens) == (0, 0)
    assert state.spent_usd == Decimal("0.000123")


async def test_settle_is_idempotent(store: QuotaStore) -> None:
    p = policy(budget_usd=Decimal("1"), max_concurrent=1, rpm=10, tpm=10_000)
    r = admitted(await store.reserve([p], EST, T0))
    spend = Spend(100, 300, 400, Decimal("0.0007"))
    first = await store.settle(r, spend, T0)
    second = await store.settle(r, spend, T0)
    assert first.applied == (True,) and second.applied == (False,)
    c = (await status_of(store, p)).counters
    assert (c.spent_micros, c.reserved_micros, c.inflight, c.tokens) == (700, 0, 0, 400)
    assert (c.window_requests, c.window_tokens) == (1, 400)  # the window holds the actual tokens, once
    admitted(await store.reserve([p], EST, T0))  # the one concurrency slot was released exactly once


@pytest.mark.parametrize("repeat", range(3))
async def test_exactly_50_of_200_concurrent_reservations_fit_a_budget_of_50(
    store: QuotaStore, repeat: int
) -> None:
    p = policy(budget_usd=usd(50 * EST_MICROS))
    outcomes = await asyncio.gather(*(store.reserve([p], EST, T0) for _ in range(200)))
    wins = [o for o in outcomes if isinstance(o, Reservation)]
    losses = [o for o in outcomes if isinstance(o, Refusal)]
    assert len(wins) == 50 and len(losses) == 150
    assert {o.breach.kind for o in losses} == {LimitKind.BUDGET_USD}
    assert (await status_of(store, p)).counters.reserved_micros == 50 * EST_MICROS


async def test_exactly_n_concurrent_admissions_for_rpm_tpm_and_concurrency(store: QuotaStore) -> None:
    cases = [
        (policy(Subject("team", "rpm"), rpm=37), 37),
        (policy(Subject("team", "tpm"), tpm=41 * EST.total_tokens), 41),
        (policy(Subject("team", "conc"), max_concurrent=23), 23),
    ]
    for p, expected in cases:
        outcomes = await asyncio.gather(*(store.reserve([p], EST, T0) for _ in range(200)))
        assert sum(isinstance(o, Reservation) for o in outcomes) == expected, p


async def test_conservative_estimates_never_exceed_the_budget(store: QuotaStore) -> None:
    p = policy(budget_usd=Decimal("0.01"))  # 20 reservations of 500
    now = T0
    total = 0
    for round_ in range(5):
        outcomes = await asyncio.gather(*(store.reserve([p], EST, now) for _ in range(30)))
        for i, o in enumerate(outcomes):
            if isinstance(o, Reservation):
                cost = (i * 37 + round_ * 11) % 501  # actual <= reserved
                total += cost
                await store.settle(o, Spend(1, 1, 2, usd(cost)), now)
        now += timedelta(seconds=1)
    c = (await status_of(store, p, now)).counters
    assert c.spent_micros == total <= 10_000
    assert c.reserved_micros == 0


async def test_overshoot_is_bounded_by_the_in_flight_excess_and_refuses_what_follows(
    store: QuotaStore,
) -> None:
    p = policy(budget_usd=usd(10 * EST_MICROS))
    flights = [admitted(await store.reserve([p], EST, T0)) for _ in range(10)]
    refused(await store.reserve([p], EST, T0))
    excess = 0
    for i, r in enumerate(flights):
        actual = EST_MICROS + 100 * i  # no max_tokens: each costs more than it reserved
        excess += actual - EST_MICROS
        await store.settle(r, Spend(100, 300, 400, usd(actual)), T0)
    c = (await status_of(store, p)).counters
    assert c.spent_micros == 10 * EST_MICROS + excess  # overshoot == the in-flight requests' excess
    zero = Estimate(0, 0, Decimal(0))
    breach = refused(await store.reserve([p], zero, T0)).breach  # even a request reserving nothing
    assert breach.kind is LimitKind.BUDGET_USD and breach.used == c.spent_micros


async def test_a_lower_actual_frees_budget_for_the_next_request(store: QuotaStore) -> None:
    p = policy(budget_usd=usd(2 * EST_MICROS))
    a = admitted(await store.reserve([p], EST, T0))
    admitted(await store.reserve([p], EST, T0))
    refused(await store.reserve([p], EST, T0))
    await store.settle(a, Spend(1, 1, 2, usd(100)), T0)
    admitted(await store.reserve([p], Estimate(0, 0, usd(400)), T0))
    refused(await store.reserve([p], Estimate(0, 0, usd(1)), T0))


async def test_token_budgets(store: QuotaStore) -> None:
    total = policy(Subject("team", "t"), tokens_budget=1000)
    prompt = policy(Subject("team", "p"), prompt_tokens_budget=250)
    completion = policy(Subject("team", "c"), completion_tokens_budget=450)
    for p, fits, kind in (
        (total, 3, LimitKind.BUDGET_TOKENS),
        (prompt, 2, LimitKind.BUDGET_PROMPT_TOKENS),
        (completion, 2, LimitKind.BUDGET_COMPLETION_TOKENS),
    ):
        for _ in range(fits):
            admitted(await store.reserve([p], EST, T0))
        breach = refused(await store.reserve([p], EST, T0)).breach
        assert breach.kind is kind
        assert breach.resets_at == datetime(2025, 4, 1, tzinfo=UTC)
        assert breach.retry_after_ms is None


# --- rate windows -------------------------------------------------------------------------------------


async def test_rpm_is_an_exact_sliding_window(store: QuotaStore) -> None:
    p = policy(rpm=3)
    for seconds in (0, 10, 20):
        admitted(await store.reserve([p], EST, T0 + timedelta(seconds=seconds)))
    breach = refused(await store.reserve([p], EST, T0 + timedelta(seconds=30))).breach
    assert (breach.kind, breach.limit, breach.used, breach.requested) == (LimitKind.RPM, 3, 3, 1)
    assert breach.retry_after_ms == 30_000  # the t0 admission leaves the window at t0 + 60 s
    assert breach.resets_at == T0 + timedelta(seconds=80)  # the t0+20 s admission leaves it then
    just_before = T0 + timedelta(seconds=60) - timedelta(milliseconds=1)
    assert refused(await store.reserve([p], EST, just_before)).breach.retry_after_ms == 1
    admitted(await store.reserve([p], EST, T0 + timedelta(seconds=60)))
    refused(await store.reserve([p], EST, T0 + timedelta(seconds=61)))
    state = await status_of(store, p, T0 + timedelta(seconds=61))
    assert state.counters.window_requests == 3
    assert state.rates.requests is not None and state.rates.requests.remaining == 0


async def test_tpm_counts_reserved_tokens_then_actual_tokens(store: QuotaStore) -> None:
    p = policy(tpm=1000)
    est = Estimate(100, 300, Decimal(0))  # 400 tokens
    first = admitted(await store.reserve([p], est, T0))
    admitted(await store.reserve([p], est, T0 + timedelta(seconds=1)))
    breach = refused(await store.reserve([p], est, T0 + timedelta(seconds=2))).breach
    assert (breach.kind, breach.used, breach.requested) == (LimitKind.TPM, 800, 400)
    assert breach.retry_after_ms == 58_000
    await store.settle(first, Spend(100, 0, 100, Decimal(0)), T0 + timedelta(seconds=2))
    admitted(await store.reserve([p], est, T0 + timedelta(seconds=2)))  # 100 + 400 + 400 <= 1000
    state = await status_of(store, p, T0 + timedelta(seconds=2))
    assert state.counters.window_tokens == 900
    too_big = refused(await store.reserve([p], Estimate(600, 500, Decimal(0)), T0 + timedelta(seconds=3)))
    assert too_big.breach.retry_after_ms is None  # larger than the whole limit: a retry cannot pass


async def test_tpm_retry_after_walks_the_window(store: QuotaStore) -> None:
    p = policy(tpm=1000)
    for i in range(10):
        admitted(await store.reserve([p], Estimate(100, 0, Decimal(0)), T0 + timedelta(seconds=i)))
    breach = refused(
        await store.reserve([p], Estimate(350, 0, Decimal(0)), T0 + timedelta(seconds=10))
    ).breach
    assert breach.retry_after_ms == 53_000  # the 4th oldest (t0+3 s) must leave: 1000-400+350 <= 1000


async def test_concurrency_limit(store: QuotaStore) -> None:
    p = policy(max_concurrent=2)
    a = admitted(await store.reserve([p], EST, T0))
    admitted(await store.reserve([p], EST, T0))
    breach = refused(await store.reserve([p], EST, T0)).breach
    assert (breach.kind, breach.limit, breach.used) == (LimitKind.CONCURRENCY, 2, 2)
    assert breach.retry_after_ms == CONCURRENCY_RETRY_MS
    await store.settle(a, Spend(), T0)
    admitted(await store.reserve([p], EST, T0))


# --- several subjects ---------------------------------------------------------------------------------


async def test_all_or_nothing_across_team_and_key(store: QuotaStore) -> None:
    team = policy(TEAM, budget_usd=Decimal("1"), rpm=100, max_concurrent=10)
    key = policy(KEY, rpm=1)
    admitted(await store.reserve([team, key], EST, T0))
    breach = refused(await store.reserve([team, key], EST, T0)).breach
    assert breach.subject == KEY and breach.kind is LimitKind.RPM
    c = (await status_of(store, team)).counters
    assert (c.reserved_micros, c.inflight, c.window_requests) == (500, 1, 1)  # unchanged by the refusal


async def test_budgets_are_reported_before_rates_across_subjects(store: QuotaStore) -> None:
    team = policy(TEAM, rpm=1)
    key = policy(KEY, budget_usd=usd(EST_MICROS))
    admitted(await store.reserve([team, key], EST, T0))
    refusal = refused(await store.reserve([team, key], EST, T0))
    assert (refusal.breach.subject, refusal.breach.kind) == (KEY, LimitKind.BUDGET_USD)
    assert refusal.rates is not None and refusal.rates.requests is not None
    assert refusal.rates.requests.remaining == 0


# --- leases, periods, seeding -------------------------------------------------------------------------


async def test_an_expired_lease_releases_and_a_late_settle_still_counts_once(
    make_store: StoreFactory,
) -> None:
    store = make_store(lease_seconds=10)
    p = policy(budget_usd=usd(EST_MICROS), max_concurrent=1)
    lost = admitted(await store.reserve([p], EST, T0))
    refused(await store.reserve([p], EST, T0 + timedelta(seconds=9)))
    c = (await status_of(store, p, T0 + timedelta(seconds=10))).counters
    assert (c.reserved_micros, c.inflight) == (0, 0)  # the lease expired: its process is presumed dead
    late = await store.settle(lost, Spend(1, 1, 2, usd(200)), T0 + timedelta(seconds=30))
    assert late.applied == (True,) and late.late == (True,)
    again = await store.settle(lost, Spend(1, 1, 2, usd(200)), T0 + timedelta(seconds=31))
    assert again.applied == (False,)
    c = (await status_of(store, p, T0 + timedelta(seconds=31))).counters
    assert (c.spent_micros, c.reserved_micros) == (200, 0)
    admitted(await store.reserve([p], Estimate(0, 0, usd(300)), T0 + timedelta(seconds=31)))


async def test_month_rolls_over_at_local_midnight(make_store: StoreFactory) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    store = make_store(tz=berlin)
    p = policy(budget_usd=usd(EST_MICROS), budget_period="month")
    march_end = datetime(2025, 3, 31, 21, 59, 59, tzinfo=UTC)  # 23:59:59 CEST
    r = admitted(await store.reserve([p], EST, march_end))
    breach = refused(await store.reserve([p], EST, march_end)).breach
    assert breach.resets_at == datetime(2025, 4, 1, tzinfo=berlin)
    april = datetime(2025, 3, 31, 22, 0, tzinfo=UTC)  # 00:00 CEST, April 1st
    admitted(await store.reserve([p], EST, april))
    state = await status_of(store, p, april)
    assert state.period_start == datetime(2025, 4, 1, tzinfo=berlin)
    assert state.counters.reserved_micros == EST_MICROS
    await store.settle(r, Spend(1, 1, 2, usd(300)), april)  # charged to March, where it was admitted
    state = await status_of(store, p, april)
    assert (state.counters.spent_micros, state.counters.reserved_micros) == (0, EST_MICROS)
    march = await status_of(store, p, march_end)
    assert (march.counters.spent_micros, march.counters.reserved_micros) == (300, 0)


@pytest.mark.parametrize(
    ("period", "tz", "now", "start"),
    [
        ("day", "America/New_York", datetime(2025, 3, 9, 4, 59, tzinfo=UTC), datetime(2025, 3, 8)),
        ("day", "America/New_York", datetime(2025, 3, 9, 5, 0, tzinfo=UTC), datetime(2025, 3, 9)),
        ("week", "Asia/Tokyo", datetime(2025, 3, 16, 14, 59, tzinfo=UTC), datetime(2025, 3, 10)),
        ("week", "Asia/Tokyo", datetime(2025, 3, 16, 15, 0, tzinfo=UTC), datetime(2025, 3, 17)),
    ],
)
async def test_day_and_week_periods_follow_the_configured_zone(
    make_store: StoreFactory, period: Any, tz: str, now: datetime, start: datetime
) -> None:
    zone: tzinfo = ZoneInfo(tz)
    store = make_store(tz=zone)
    p = policy(budget_usd=usd(EST_MICROS), budget_period=period)
    admitted(await store.reserve([p], EST, now))
    state = await status_of(store, p, now)
    assert state.period_start == start.replace(tzinfo=zone)
    assert state.counters.reserved_micros == EST_MICROS


async def test_seed_only_when_absent(store: QuotaStore) -> None:
    p = policy(budget_usd=usd(1000), tokens_budget=10_000)
    start = datetime(2025, 3, 1, tzinfo=UTC)
    assert await store.seed_spent(TEAM, "month", start, Spend(10, 20, 30, usd(600)), T0)
    assert not await store.seed_spent(TEAM, "month", start, Spend(1, 1, 2, usd(1)), T0)
    c = (await status_of(store, p)).counters
    assert (c.spent_micros, c.tokens, c.prompt_tokens, c.completion_tokens) == (600, 30, 10, 20)
    assert refused(await store.reserve([p], EST, T0)).breach.used == 600  # 600 + 500 > 1000
    admitted(await store.reserve([p], Estimate(0, 0, usd(400)), T0))


async def test_seed_does_not_override_counters_a_settle_wrote(store: QuotaStore) -> None:
    p = policy(budget_usd=usd(1000))
    r = admitted(await store.reserve([p], EST, T0))
    await store.settle(r, Spend(1, 1, 2, usd(5)), T0)
    assert not await store.seed_spent(TEAM, "month", datetime(2025, 3, 1, tzinfo=UTC), Spend(), T0)


# --- soft thresholds and status -----------------------------------------------------------------------


async def test_soft_threshold_is_reported_once_per_period(store: QuotaStore) -> None:
    p = policy(budget_usd=usd(10 * EST_MICROS), soft_ratio=Decimal("0.8"))
    crossings: list[tuple[Subject, LimitKind]] = []
    for _ in range(10):
        crossings += admitted(await store.reserve([p], EST, T0)).soft_crossings
    assert crossings == [(TEAM, LimitKind.BUDGET_USD)]


async def test_a_settle_past_the_soft_threshold_reports_it(store: QuotaStore) -> None:
    p = policy(budget_usd=usd(10 * EST_MICROS))
    r = admitted(await store.reserve([p], EST, T0))
    assert r.soft_crossings == ()
    settled = await store.settle(r, Spend(1, 1, 2, usd(9 * EST_MICROS)), T0)
    assert settled.soft_crossings == ((TEAM, LimitKind.BUDGET_USD),)


async def test_status_lists_every_limit(store: QuotaStore) -> None:
    p = policy(
        budget_usd=Decimal("2"),
        tokens_budget=5000,
        prompt_tokens_budget=4000,
        completion_tokens_budget=3000,
        rpm=60,
        tpm=6000,
        max_concurrent=4,
    )
    r = admitted(await store.reserve([p], EST, T0))
    await store.settle(r, Spend(10, 20, 30, Decimal("0.25")), T0)
    admitted(await store.reserve([p], EST, T0))
    usage = {u.kind: (u.limit, u.used, u.reserved) for u in (await status_of(store, p)).usage()}
    assert usage == {
        LimitKind.BUDGET_USD: (Decimal("2"), Decimal("0.25"), Decimal("0.0005")),
        LimitKind.BUDGET_TOKENS: (5000, 30, 300),
        LimitKind.BUDGET_PROMPT_TOKENS: (4000, 10, 100),
        LimitKind.BUDGET_COMPLETION_TOKENS: (3000, 20, 200),
        LimitKind.RPM: (60, 2, 0),
        LimitKind.TPM: (6000, 330, 0),
        LimitKind.CONCURRENCY: (4, 1, 0),
    }


async def test_a_zero_limit_refuses_everything(store: QuotaStore) -> None:
    for p in (policy(budget_usd=Decimal(0)), policy(rpm=0), policy(max_concurrent=0)):
        refused(await store.reserve([p], Estimate(0, 0, Decimal(0)), T0))


async def test_amounts_beyond_32_bits_stay_exact(store: QuotaStore) -> None:
    """Micro-USD and token counters pass 2^32 (a $5,000 budget is 5e9 micro-USD): the scripts'
    arithmetic and number formatting must stay exact up to the documented 2^53."""
    big = 2**52 + 12_345  # micro-USD: ~$4.5 billion
    p = policy(budget_usd=usd(2**53 - 1), tokens_budget=2**53 - 1)
    r = admitted(await store.reserve([p], EST, T0))
    await store.settle(r, Spend(2**40 + 7, 2**41 + 9, 2**40 + 2**41 + 16, usd(big)), T0)
    c = (await status_of(store, p)).counters
    assert (c.spent_micros, c.tokens, c.prompt_tokens) == (big, 2**40 + 2**41 + 16, 2**40 + 7)
    assert c.reserved_micros == 0
