"""Admission: the forward path's view of quotas (estimates, rejections, headers, metrics, failure policy)."""

from __future__ import annotations

import asyncio
import logging
import socket
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from meter.quota.admission import UNLIMITED, Admission, AdmissionResult
from meter.quota.memory import MemoryStore
from meter.quota.policy import Limits, Policy, Subject
from meter.quota.redis_store import RedisStore, connect
from meter.quota.spend import Estimate, Spend
from meter.quota.store import Reservation, Settlement
from meter.records import Usage
from meter.tap.request import inspect_request
from tests.support.processes import free_port
from tests.support.quota import FP, INFO, T0, CountingStore, StoreFactory, body, make_admission, price


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def header(result: AdmissionResult, name: str) -> str | None:
    headers = result.rejection.headers if result.rejection is not None else (result.headers or [])
    values = [v.decode() for n, v in headers if n.decode() == name]
    return values[0] if values else None


def error_of(result: AdmissionResult) -> dict[str, Any]:
    assert result.rejection is not None
    parsed: dict[str, Any] = orjson.loads(result.rejection.body)["error"]
    return parsed


# --- the cheap path -----------------------------------------------------------------------------------


async def test_no_policy_means_no_store_call() -> None:
    store = CountingStore()
    admission, _ = make_admission(store, team=None, key=Limits())
    assert await admission.admit("acme", FP, INFO, T0) is UNLIMITED
    assert await admission.admit("other", None, INFO, T0) is UNLIMITED
    assert store.calls == 0


# --- admitted -----------------------------------------------------------------------------------------


async def test_admitted_requests_carry_openai_rate_limit_headers(make_store: StoreFactory) -> None:
    admission, registry = make_admission(make_store(), team=Limits(rpm=10, tpm=10_000, max_concurrent=3))
    result = await admission.admit("acme", FP, INFO, T0)
    assert result.allowed and result.reservation is not None
    assert result.reservation.estimate == Estimate(100, 200, Decimal("0.0005"), "m")
    assert result.headers == [
        (b"x-ratelimit-limit-requests", b"10"),
        (b"x-ratelimit-remaining-requests", b"9"),
        (b"x-ratelimit-reset-requests", b"1m0s"),
        (b"x-ratelimit-limit-tokens", b"10000"),
        (b"x-ratelimit-remaining-tokens", b"9700"),
        (b"x-ratelimit-reset-tokens", b"1m0s"),
    ]
    assert sample(registry, "meter_ratelimit_remaining", team="acme", kind="requests") == 9
    assert sample(registry, "meter_ratelimit_remaining", team="acme", kind="tokens") == 9700
    assert sample(registry, "meter_ratelimit_remaining", team="acme", kind="concurrency") == 2


async def test_headers_show_the_tighter_of_team_and_key(make_store: StoreFactory) -> None:
    admission, _ = make_admission(make_store(), team=Limits(rpm=100), key=Limits(rpm=5))
    result = await admission.admit("acme", FP, INFO, T0)
    assert header(result, "x-ratelimit-limit-requests") == "5"
    assert header(result, "x-ratelimit-remaining-requests") == "4"
    assert header(result, "x-ratelimit-limit-tokens") is None


async def test_exactly_50_of_200_concurrent_admissions(make_store: StoreFactory) -> None:
    admission, registry = make_admission(make_store(), team=Limits(budget_usd=Decimal("0.025")))
    results = await asyncio.gather(*(admission.admit("acme", FP, INFO, T0) for _ in range(200)))
    assert sum(r.allowed for r in results) == 50
    assert sample(registry, "meter_quota_rejections_total", team="acme", reason="budget_usd") == 150


# --- rejections ---------------------------------------------------------------------------------------


async def test_budget_rejection_is_final(make_store: StoreFactory) -> None:
    admission, registry = make_admission(make_store(), team=Limits(budget_usd=Decimal("0.0005")))
    assert (await admission.admit("acme", FP, INFO, T0)).allowed
    result = await admission.admit("acme", FP, INFO, T0)
    assert not result.allowed and result.rejection is not None
    assert result.rejection.status == 429
    error = error_of(result)
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert error["message"] == (
        "You exceeded the monthly budget of team 'acme': limit $0.0005, used $0.0005, "
        "this request reserves up to $0.0005. It resets at 2025-04-01T00:00:00+00:00."
    )
    assert header(result, "x-should-retry") == "false"
    assert header(result, "retry-after") is None
    assert header(result, "content-type") == "application/json"
    assert header(result, "content-length") == str(len(result.rejection.body))
    assert sample(registry, "meter_quota_rejections_total", team="acme", reason="budget_usd") == 1


async def test_rate_rejection_says_when_to_retry(make_store: StoreFactory) -> None:
    admission, registry = make_admission(make_store(), key=Limits(rpm=1))
    assert (await admission.admit("acme", FP, INFO, T0)).allowed
    result = await admission.admit("acme", FP, INFO, T0 + timedelta(seconds=20, milliseconds=500))
    assert result.rejection is not None and result.rejection.status == 429
    error = error_of(result)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert error["message"] == (
        "Rate limit reached for requests per min (RPM) of this API key: limit 1, used 1, requested 1. "
        "Please try again in 39.5s."
    )
    assert FP not in error["message"]
    assert header(result, "retry-after") == "40"
    assert header(result, "retry-after-ms") == "39500"
    assert header(result, "x-should-retry") is None  # 429s are retried by the SDK, honouring retry-after
    assert header(result, "x-ratelimit-remaining-requests") == "0"
    assert header(result, "x-ratelimit-reset-requests") == "39.5s"
    assert sample(registry, "meter_quota_rejections_total", team="acme", reason="rpm") == 1


async def test_a_request_larger_than_the_tpm_is_told_not_to_retry() -> None:
    admission, _ = make_admission(MemoryStore(), team=Limits(tpm=250))
    result = await admission.admit("acme", FP, INFO, T0)
    error = error_of(result)
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert header(result, "x-should-retry") == "false" and header(result, "retry-after") is None


async def test_embeddings_reserve_no_output() -> None:
    admission, _ = make_admission(MemoryStore(), team=Limits(tpm=150))
    info = inspect_request(orjson.dumps({"model": "m", "input": "x" * 400}))
    result = await admission.admit("acme", None, info, T0, endpoint="/v1/embeddings")
    assert result.allowed and result.reservation is not None
    assert result.reservation.estimate.total_tokens == 100


# --- settle -------------------------------------------------------------------------------------------


async def test_settle_prices_the_actual_usage_and_updates_the_gauges(make_store: StoreFactory) -> None:
    admission, registry = make_admission(make_store(), team=Limits(budget_usd=Decimal("0.01")))
    result = await admission.admit("acme", FP, INFO, T0)
    assert result.reservation is not None
    assert sample(registry, "meter_budget_remaining_usd", team="acme") == pytest.approx(0.0095)
    assert sample(registry, "meter_budget_used_ratio", team="acme") == pytest.approx(0.05)
    usage = Usage(prompt_tokens=120, completion_tokens=50, cached_tokens=20)
    spend = await admission.settle(result.reservation, usage, None, T0)
    assert spend == Spend(120, 50, 170, Decimal("0.00021"))  # (100 x $1 + 20 x $0.5 + 50 x $2) / 1M
    assert sample(registry, "meter_budget_remaining_usd", team="acme") == pytest.approx(0.00979)
    assert sample(registry, "meter_budget_used_ratio", team="acme") == pytest.approx(0.021)
    # the names the dashboards and alert rules use
    assert sample(registry, "meter_team_budget_usd", team="acme", period="month") == pytest.approx(0.01)
    assert sample(registry, "meter_team_spend_usd", team="acme", period="month") == pytest.approx(0.00021)
    assert sample(registry, "meter_quota_overshoot_usd_total", team="acme") in (None, 0.0)


async def test_overshoot_is_counted_and_the_next_request_refused(make_store: StoreFactory) -> None:
    admission, registry = make_admission(make_store(), team=Limits(budget_usd=Decimal("0.01")))
    info = inspect_request(body(max_tokens=None))
    first = await admission.admit("acme", None, info, T0)  # no max_tokens: 4096 output tokens reserved
    assert first.reservation is not None
    assert first.reservation.estimate.cost_micros == 100 + 2 * 4096
    await admission.settle(first.reservation, Usage(100, 10_000), Decimal("0.0201"), T0)
    excess = Decimal("0.0201") - first.reservation.estimate.cost_usd
    assert sample(registry, "meter_quota_overshoot_usd_total", team="acme") == pytest.approx(float(excess))
    assert sample(registry, "meter_budget_remaining_usd", team="acme") == pytest.approx(-0.0101)
    assert not (await admission.admit("acme", None, inspect_request(body(max_tokens=0)), T0)).allowed


async def test_unknown_usage_charges_the_reservation_and_zero_usage_charges_nothing() -> None:
    store = MemoryStore()
    limits = Limits(budget_usd=Decimal("1"), tokens_budget=10_000)
    admission, _ = make_admission(store, team=limits)
    a = (await admission.admit("acme", None, INFO, T0)).reservation
    b = (await admission.admit("acme", None, INFO, T0)).reservation
    assert a is not None and b is not None
    assert await admission.settle(a, None, None, T0) == Spend(100, 200, 300, Decimal("0.0005"))
    assert await admission.settle(b, Usage(prompt_tokens=0, completion_tokens=0), None, T0) == Spend(
        0, 0, 0, Decimal(0)
    )
    (state,) = await admission.status("acme", None, T0)
    c = state.counters
    assert (c.spent_micros, c.tokens, c.reserved_micros) == (500, 300, 0)


async def test_soft_threshold_raises_a_metric_and_a_log_line(
    make_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    admission, registry = make_admission(make_store(), team=Limits(budget_usd=Decimal("0.0025")))
    with caplog.at_level(logging.WARNING, logger="meter.quota"):
        for _ in range(5):
            assert (await admission.admit("acme", None, INFO, T0)).allowed
    assert (
        sample(registry, "meter_quota_soft_limit_total", team="acme", scope="team", limit="budget_usd") == 1
    )
    lines = [r.getMessage() for r in caplog.records if "soft limit" in r.getMessage()]
    assert lines == ["quota soft limit reached: team:acme budget_usd at 0.002 of 0.0025 (soft ratio 0.8)"]


# --- failure policy -----------------------------------------------------------------------------------


def unreachable_redis() -> RedisStore:
    return RedisStore(connect(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5), prefix="meter-test:down:")


async def test_redis_down_fails_closed_for_budgets(caplog: pytest.LogCaptureFixture) -> None:
    admission, registry = make_admission(unreachable_redis(), team=Limits(budget_usd=Decimal(1), rpm=10))
    with caplog.at_level(logging.WARNING, logger="meter.quota"):
        result = await admission.admit("acme", FP, INFO, T0)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "meter.quota"]
    assert line.startswith("quota store redis unavailable (") and "did not answer" not in line
    assert not result.allowed and result.rejection is not None
    assert result.rejection.status == 503
    error = error_of(result)
    assert (error["type"], error["code"]) == ("api_error", "quota_unavailable")
    assert header(result, "retry-after") == "1"
    assert sample(registry, "meter_quota_fallbacks_total", store="redis", policy="closed") == 1
    assert sample(registry, "meter_quota_rejections_total", team="acme", reason="store_unavailable") == 1
    await admission.store.aclose()


@pytest.mark.integration
async def test_a_redis_that_does_not_answer_times_out_into_the_failure_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A blackholed Redis (the connection is accepted, nothing ever answers): the client's timeout
    turns it into the failure policy, it does not hang the request, and the log says it was a
    timeout (which a saturated meter causes too), not that Redis is down."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        store = RedisStore(connect(f"redis://127.0.0.1:{port}/0", timeout=0.2), prefix="meter-test:mute:")
        admission, registry = make_admission(store, team=Limits(budget_usd=Decimal(1)), key=Limits(rpm=5))
        with caplog.at_level(logging.WARNING, logger="meter.quota"):
            result = await asyncio.wait_for(admission.admit("acme", FP, INFO, T0), 5)
        assert result.rejection is not None and result.rejection.status == 503
        (line,) = [r.getMessage() for r in caplog.records if r.name == "meter.quota"]
        assert line.startswith("quota store redis did not answer in time (")
        assert "check its CPU before the store" in line
        assert sample(registry, "meter_quota_fallbacks_total", store="redis", policy="closed") == 1
        await store.aclose()


async def test_redis_down_fails_open_for_rates() -> None:
    admission, registry = make_admission(unreachable_redis(), team=Limits(rpm=1, tpm=10, max_concurrent=1))
    results = [await admission.admit("acme", FP, INFO, T0) for _ in range(3)]
    assert all(r.allowed for r in results)
    reservation = results[0].reservation
    assert reservation is not None and reservation.degraded
    assert await admission.settle(reservation, Usage(1, 1), None, T0) is None
    assert sample(registry, "meter_quota_fallbacks_total", store="redis", policy="open") == 3
    # the store was tried once: after an error it is left alone for retry_store_after seconds
    assert sample(registry, "meter_quota_store_errors_total", store="redis", op="reserve") == 1
    await admission.admit("acme", FP, INFO, T0 + timedelta(seconds=1))
    assert sample(registry, "meter_quota_store_errors_total", store="redis", op="reserve") == 2
    await admission.store.aclose()


@pytest.mark.parametrize(
    ("limits", "config", "allowed"),
    [
        (Limits(budget_usd=Decimal(1)), {"budget_failure": "open"}, True),
        (Limits(rpm=10), {"rate_failure": "closed"}, False),
        (Limits(budget_usd=Decimal(1), rpm=10), {"budget_failure": "open"}, True),
        (Limits(budget_usd=Decimal(1), rpm=10), {"budget_failure": "open", "rate_failure": "closed"}, False),
    ],
)
async def test_failure_policies_are_settable(limits: Limits, config: dict[str, Any], allowed: bool) -> None:
    admission, registry = make_admission(unreachable_redis(), team=limits, **config)
    result = await admission.admit("acme", None, INFO, T0)
    assert result.allowed is allowed
    policy = "open" if allowed else "closed"
    assert sample(registry, "meter_quota_fallbacks_total", store="redis", policy=policy) == 1
    await admission.store.aclose()


async def test_a_failed_settle_is_retried_after_the_store_returns() -> None:
    store = CountingStore()
    admission, registry = make_admission(store, team=Limits(budget_usd=Decimal(1)))
    a = (await admission.admit("acme", None, INFO, T0)).reservation
    b = (await admission.admit("acme", None, INFO, T0)).reservation
    assert a is not None and b is not None
    store.down = True
    await admission.settle(a, Usage(10, 10), Decimal("0.0001"), T0)
    assert sample(registry, "meter_quota_store_errors_total", store="memory", op="settle") == 1
    store.down = False
    later = T0 + timedelta(seconds=2)
    await admission.settle(b, Usage(10, 10), Decimal("0.0002"), later)
    (state,) = await admission.status("acme", None, later)
    c = state.counters
    assert (c.spent_micros, c.reserved_micros, c.inflight) == (300, 0, 0)


# --- operator views -----------------------------------------------------------------------------------


async def test_status_and_seed(make_store: StoreFactory) -> None:
    team_limits = Limits(budget_usd=Decimal(10), budget_period="week", rpm=5)
    admission, _ = make_admission(make_store(), team=team_limits, key=Limits(max_concurrent=2))
    start, end = admission.period_of(team_limits, T0)
    assert (start, end) == (datetime(2025, 3, 10, tzinfo=UTC), datetime(2025, 3, 17, tzinfo=UTC))
    assert await admission.seed(Subject("team", "acme"), team_limits, Spend(1, 2, 3, Decimal("9.9995")), T0)
    assert (await admission.admit("acme", FP, INFO, T0)).allowed  # exactly fills the budget
    assert not (await admission.admit("acme", FP, INFO, T0)).allowed
    team_state, key_state = await admission.status("acme", FP, T0)
    assert team_state.subject == Subject("team", "acme") and key_state.subject == Subject("key", FP)
    assert team_state.spent_usd == Decimal("9.9995") and team_state.reserved_usd == Decimal("0.0005")
    assert key_state.counters.inflight == 1


async def test_refresh_gauges_sets_the_team_gauges_from_the_store(make_store: StoreFactory) -> None:
    """A stale gauge (an out-of-order reply, a quiet team) converges on the store's counters."""
    store = make_store()
    limits = Limits(budget_usd=Decimal("1"))
    team = Policy(Subject("team", "acme"), limits)
    registry = CollectorRegistry()
    admission = Admission(store, lambda t, k: (limits, None), price, registry=registry)
    await store.seed_spent(team.subject, "month", T0, Spend(cost_usd=Decimal("0.25")), T0)
    admission.metrics.budget_remaining.labels("acme").set(123.0)  # stale
    await admission.refresh_gauges([("acme", limits)], T0)
    assert registry.get_sample_value("meter_budget_remaining_usd", {"team": "acme"}) == 0.75
    assert registry.get_sample_value("meter_budget_used_ratio", {"team": "acme"}) == 0.25


# --- settling off the response path (Rule 0) ----------------------------------------------------------


class SlowSettleStore(CountingStore):
    """Settles only when ``release`` is set: a store round trip still in flight."""

    ordered = False

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def settle(self, reservation: Reservation, spend: Spend, now: datetime) -> Settlement:
        await self.release.wait()
        return await super().settle(reservation, spend, now)


async def test_a_started_settle_completes_when_its_awaiter_is_cancelled() -> None:
    """The forward path starts the settle before the response's last byte and awaits it after; a
    client leaving in between cancels the awaiting task, never the settle."""
    store = SlowSettleStore()
    admission, _ = make_admission(store, team=Limits(max_concurrent=1))
    first = await admission.admit("acme", None, INFO, T0)
    assert first.allowed and first.reservation is not None
    settling = admission.start_settle(first.reservation, Usage(100, 10, total_tokens=110), None, T0)
    awaiter = asyncio.ensure_future(asyncio.shield(settling))
    await asyncio.sleep(0.01)
    awaiter.cancel()
    assert not (await admission.admit("acme", None, INFO, T0)).allowed  # the slot is still held
    store.release.set()
    assert (await settling) is not None
    assert (await admission.admit("acme", None, INFO, T0)).allowed  # settled: the slot is free
