"""The pure parts of quotas: limits, periods, estimates, decide, and what clients see."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from meter.quota.decision import Breach, Counters, LimitKind, admits, decide, first_breach, rate_retry_ms
from meter.quota.periods import period_window
from meter.quota.policy import Limits, Subject
from meter.quota.responses import (
    RateSnapshot,
    RateState,
    format_reset,
    ratelimit_headers,
    reject,
    unavailable,
)
from meter.quota.spend import Estimate, Spend, actual_spend, estimate, to_micros
from meter.records import Usage
from meter.tap.request import RequestInfo, inspect_request

TEAM = Subject("team", "acme")
KEY = Subject("key", "ab" * 32)


@dataclass(frozen=True)
class FlatPrice:
    input: Decimal = Decimal("0.9")
    cached_input: Decimal | None = None
    output: Decimal = Decimal("2.7")


# --- limits -------------------------------------------------------------------------------------------


def test_limits_validate_and_round_trip() -> None:
    limits = Limits.from_dict({"budget_usd": "12.50", "budget_period": "week", "rpm": 60, "soft_ratio": 0.9})
    assert limits.budget_usd == Decimal("12.50") and limits.budget_micros == 12_500_000
    assert limits.soft_ratio == Decimal("0.9")
    assert Limits.from_dict(orjson.loads(orjson.dumps(limits.to_dict()))) == limits
    assert Limits().is_empty and not limits.is_empty


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"budget_usd": "-1"}, "budget_usd must not be negative"),
        ({"budget_usd": "lots"}, "budget_usd must be a decimal number"),
        ({"budget_usd": "NaN"}, "budget_usd must be a finite Decimal"),
        ({"budget_period": "year"}, "budget_period must be one of day, week, month"),
        ({"rpm": -1}, "rpm must be a non-negative integer"),
        ({"tpm": 1.5}, "tpm must be a non-negative integer"),
        ({"soft_ratio": "1.5"}, "soft_ratio must be a Decimal in (0, 1]"),
        ({"rpn": 5}, "unknown quota limit(s): rpn"),
    ],
)
def test_bad_limits_name_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        Limits.from_dict(data)


# --- periods ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "tz", "now", "start", "end"),
    [
        (
            "day",
            "UTC",
            datetime(2025, 3, 14, 23, 59, tzinfo=UTC),
            datetime(2025, 3, 14),
            datetime(2025, 3, 15),
        ),
        ("week", "UTC", datetime(2025, 3, 16, 12, tzinfo=UTC), datetime(2025, 3, 10), datetime(2025, 3, 17)),
        ("week", "UTC", datetime(2025, 3, 17, 0, tzinfo=UTC), datetime(2025, 3, 17), datetime(2025, 3, 24)),
        ("month", "UTC", datetime(2025, 12, 31, 23, tzinfo=UTC), datetime(2025, 12, 1), datetime(2026, 1, 1)),
        ("month", "UTC", datetime(2024, 2, 29, 12, tzinfo=UTC), datetime(2024, 2, 1), datetime(2024, 3, 1)),
        # 23:30 UTC on Jan 31st is already February 1st in Berlin
        (
            "month",
            "Europe/Berlin",
            datetime(2025, 1, 31, 23, 30, tzinfo=UTC),
            datetime(2025, 2, 1),
            datetime(2025, 3, 1),
        ),
        # and 03:00 UTC on March 1st is still February in Los Angeles
        (
            "month",
            "America/Los_Angeles",
            datetime(2025, 3, 1, 3, tzinfo=UTC),
            datetime(2025, 2, 1),
            datetime(2025, 3, 1),
        ),
    ],
)
def test_period_window_is_calendar_aligned(
    period: Any, tz: str, now: datetime, start: datetime, end: datetime
) -> None:
    zone = ZoneInfo(tz)
    assert period_window(period, now, zone) == (start.replace(tzinfo=zone), end.replace(tzinfo=zone))


def test_days_across_dst_are_23_and_25_hours_long() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    spring = period_window("day", datetime(2025, 3, 30, 12, tzinfo=UTC), berlin)
    autumn = period_window("day", datetime(2025, 10, 26, 12, tzinfo=UTC), berlin)
    assert spring[1].astimezone(UTC) - spring[0].astimezone(UTC) == timedelta(hours=23)
    assert autumn[1].astimezone(UTC) - autumn[0].astimezone(UTC) == timedelta(hours=25)


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        period_window("day", datetime(2025, 1, 1), UTC)


# --- estimates and actual spend ------------------------------------------------------------------------


def info(**payload: Any) -> RequestInfo:
    return inspect_request(
        orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 40}], **payload})
    )


@pytest.mark.parametrize(
    ("payload", "completion"),
    [
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 70, "max_tokens": 50}, 70),
        ({"max_output_tokens": 30}, 30),
        ({}, 1000),  # the configured default
        ({"max_tokens": 50, "n": 3}, 150),
        ({"max_tokens": True}, 1000),  # not an integer: ignored
        ({"max_tokens": 0}, 0),
    ],
)
def test_estimate_reserves_the_prompt_and_the_output_cap(payload: dict[str, Any], completion: int) -> None:
    est = estimate(info(**payload), FlatPrice(), 1000)
    # 40 characters = 10 tokens, plus TEMPLATE_TOKENS_PER_MESSAGE for the one chat message
    assert (est.prompt_tokens, est.completion_tokens) == (18, completion)
    assert est.cost_usd == (18 * Decimal("0.9") + completion * Decimal("2.7")) / 1_000_000
    assert est.model == "m"


def test_estimate_edge_cases() -> None:
    assert estimate(info(max_tokens=5), None, 100).cost_usd == 0  # unpriced: tokens count, dollars not
    assert estimate(info(max_tokens=5), None, 100).total_tokens == 23
    assert estimate(RequestInfo(), FlatPrice(), 100) == Estimate(0, 0, Decimal(0))  # not JSON
    assert estimate(info(), FlatPrice(), 100, endpoint="/v1/embeddings").completion_tokens == 0


def test_completions_prompts_get_no_template_tokens() -> None:
    est = estimate(inspect_request(orjson.dumps({"model": "m", "prompt": "x" * 40})), FlatPrice(), 0)
    assert est.prompt_tokens == 10


def test_spend_rounds_to_the_nearest_micro_usd() -> None:
    """Reservations round up; settled spend to the nearest, so sums stay unbiased."""
    assert Spend(cost_usd=Decimal("0.0000054")).cost_micros == 5
    assert Spend(cost_usd=Decimal("0.0000055")).cost_micros == 6
    assert Spend(cost_usd=Decimal("0.0000065")).cost_micros == 6  # half to even
    assert sum(Spend(cost_usd=Decimal("0.0000054")).cost_micros for _ in range(10)) == 50


def test_money_rounds_up_to_micro_usd() -> None:
    assert to_micros(Decimal("0.0000001")) == 1
    assert to_micros(Decimal("0.000001")) == 1
    assert to_micros(Decimal("1.2345671")) == 1_234_568
    assert Limits(budget_usd=Decimal("0.0000019")).budget_micros == 1  # budgets round down


def test_actual_spend() -> None:
    est = Estimate(10, 100, Decimal("0.5"), "m")
    price = FlatPrice(cached_input=Decimal("0.1"))
    assert actual_spend(est, None, None, price) == Spend(10, 100, 110, Decimal("0.5"))
    assert actual_spend(est, Usage(12, 3), Decimal("0.01"), price) == Spend(12, 3, 15, Decimal("0.01"))
    spent = actual_spend(est, Usage(prompt_tokens=20, completion_tokens=5, cached_tokens=10), None, price)
    assert spent.cost_usd == (10 * Decimal("0.9") + 10 * Decimal("0.1") + 5 * Decimal("2.7")) / 1_000_000
    # a missing field is not zero: it falls back to the estimate
    assert actual_spend(est, Usage(prompt_tokens=20), None, None) == Spend(20, 100, 120, Decimal("0.5"))
    assert actual_spend(est, Usage(prompt_tokens=20, total_tokens=26), None, None).completion_tokens == 6


# --- decide -------------------------------------------------------------------------------------------


def test_the_refusal_rule() -> None:
    assert admits(0, 10, 10) and not admits(0, 11, 10)
    assert admits(9, 0, 10) and not admits(10, 0, 10)  # a limit reached refuses even free requests
    assert not admits(0, 0, 0)


def test_decide_reports_the_first_limit_in_kind_order() -> None:
    limits = Limits(budget_usd=Decimal("0.001"), rpm=1, max_concurrent=1, tokens_budget=1000)
    full = Counters(spent_micros=1000, window_requests=1, inflight=1, tokens=1000)
    est = Estimate(1, 1, Decimal("0.000001"))
    assert decide(TEAM, full, est, limits) == Breach(TEAM, LimitKind.BUDGET_USD, 1000, 1000, 1)
    assert decide(TEAM, Counters(window_requests=1, inflight=1), est, limits) == Breach(
        TEAM, LimitKind.RPM, 1, 1, 1
    )
    assert decide(TEAM, Counters(), est, limits) is None
    team_rate = Breach(TEAM, LimitKind.RPM, 1, 1, 1)
    key_budget = Breach(KEY, LimitKind.BUDGET_TOKENS, 1, 1, 1)
    assert first_breach([team_rate, key_budget]) is key_budget
    assert first_breach([None, team_rate, Breach(KEY, LimitKind.RPM, 1, 1, 1)]) is team_rate


def test_rate_retry_times() -> None:
    entries = [(1000, 10), (2000, 10), (3000, 10)]
    assert rate_retry_ms(entries, LimitKind.RPM, 3, 1, 4000) == 57_000
    assert rate_retry_ms(entries, LimitKind.RPM, 2, 1, 4000) == 58_000
    assert rate_retry_ms(entries, LimitKind.RPM, 0, 1, 4000) is None
    assert rate_retry_ms(entries, LimitKind.TPM, 30, 15, 4000) == 58_000
    assert rate_retry_ms(entries, LimitKind.TPM, 30, 31, 4000) is None


# --- responses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (-5, "0s"),
        (17, "17ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (7660, "7.66s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (90_500, "1m30.5s"),
        (3_723_004, "1h2m3.004s"),
    ],
)
def test_reset_durations_are_formatted_like_openai(ms: int, text: str) -> None:
    assert format_reset(ms) == text


def test_ratelimit_headers_only_for_limits_that_exist() -> None:
    assert ratelimit_headers(None) == []
    assert ratelimit_headers(RateSnapshot(tokens=RateState(1000, -5, 1200))) == [
        (b"x-ratelimit-limit-tokens", b"1000"),
        (b"x-ratelimit-remaining-tokens", b"0"),
        (b"x-ratelimit-reset-tokens", b"1.2s"),
    ]


def headers(rejection: Any) -> dict[str, str]:
    return {n.decode(): v.decode() for n, v in rejection.headers}


@pytest.mark.parametrize(
    "kind", [LimitKind.BUDGET_USD, LimitKind.BUDGET_TOKENS, LimitKind.BUDGET_PROMPT_TOKENS]
)
def test_budget_rejections_carry_x_should_retry_false(kind: LimitKind) -> None:
    resets = datetime(2025, 4, 1, tzinfo=UTC)
    rejection = reject(Breach(TEAM, kind, 10_000_000, 9_999_000, 2000, None, resets), None, "day")
    h = headers(rejection)
    assert rejection.status == 429 and rejection.reason == kind.value
    assert h["x-should-retry"] == "false" and "retry-after" not in h
    error = orjson.loads(rejection.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "daily" in error["message"] and "2025-04-01T00:00:00+00:00" in error["message"]
    if kind is LimitKind.BUDGET_USD:
        assert "limit $10.00, used $9.999" in error["message"]


@pytest.mark.parametrize(
    ("kind", "error_type"),
    [(LimitKind.RPM, "requests"), (LimitKind.TPM, "tokens"), (LimitKind.CONCURRENCY, "requests")],
)
def test_rate_rejections_carry_retry_after(kind: LimitKind, error_type: str) -> None:
    rejection = reject(Breach(KEY, kind, 60, 60, 1, 1001), RateSnapshot(RateState(60, 0, 59_000)))
    h = headers(rejection)
    assert h["retry-after"] == "2" and h["retry-after-ms"] == "1001"
    assert "x-should-retry" not in h
    assert h["x-ratelimit-remaining-requests"] == "0" and h["x-ratelimit-reset-requests"] == "59s"
    error = orjson.loads(rejection.body)["error"]
    assert (error["type"], error["code"]) == (error_type, "rate_limit_exceeded")
    assert "this API key" in error["message"] and KEY.name not in error["message"]


def test_store_unavailable_is_a_503_the_sdk_retries() -> None:
    rejection = unavailable(TEAM)
    assert rejection.status == 503 and headers(rejection)["retry-after"] == "1"
    assert orjson.loads(rejection.body)["error"]["code"] == "quota_unavailable"


@pytest.mark.integration
def test_the_pure_modules_import_no_io_library() -> None:
    code = (
        "import sys, meter.quota.policy, meter.quota.periods, meter.quota.spend, meter.quota.decision,"
        " meter.quota.responses, meter.quota.memory, meter.quota.store;"
        "io = {'redis', 'litestar', 'httpx', 'sqlalchemy', 'aiohttp'};"
        "bad = {m.split('.')[0] for m in sys.modules} & io;"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
