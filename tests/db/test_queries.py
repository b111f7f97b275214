"""Report queries as a contract over SQLite and PostgreSQL: grouping, sums that keep "not reported"
apart from zero, UTC day grouping, filters and time ranges, and recent requests."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.insert import write_batch
from meter.db.queries import GROUPS, recent_requests, usage_summary
from meter.records import Outcome, UsageRecord, UsageSource
from tests.conftest_db import make_record

KEY_A, KEY_B = "a" * 64, "b" * 64
MAY1 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PLUS2 = timezone(timedelta(hours=2))
MINUS5 = timezone(timedelta(hours=-5))

# Records are named so expectations below can refer to them.
DATASET: dict[str, UsageRecord] = {
    "a1": make_record(
        key_fingerprint=KEY_A, key_suffix="...aaaa", team="search", requested_model="llama",
        started_at=MAY1, prompt_tokens=100, completion_tokens=20, cached_tokens=50, total_tokens=120,
    ),
    "a2": make_record(
        key_fingerprint=KEY_A, key_suffix="...aaaa", team="search", requested_model="llama",
        # 00:30 on May 2nd at UTC+2 is still May 1st in UTC.
        started_at=datetime(2024, 5, 2, 0, 30, tzinfo=PLUS2),
        prompt_tokens=10, completion_tokens=5, reasoning_tokens=3, total_tokens=15,
    ),
    "a3_missing": make_record(
        key_fingerprint=KEY_A, key_suffix="...aaaa", team="search", requested_model="llama",
        # 20:00 on May 1st at UTC-5 is May 2nd in UTC.
        started_at=datetime(2024, 5, 1, 20, 0, tzinfo=MINUS5),
        usage_source=UsageSource.MISSING, outcome=Outcome.ABORTED, status_code=499, stream=True,
    ),
    "b1": make_record(
        key_fingerprint=KEY_B, key_suffix="...bbbb", team="ads", requested_model="mixtral",
        endpoint="/v1/completions", started_at=MAY1 + timedelta(days=1, hours=1),
        prompt_tokens=7, completion_tokens=None, total_tokens=None,
    ),
    "b2_error": make_record(
        key_fingerprint=KEY_B, key_suffix="...bbbb", team="ads", requested_model="mixtral",
        started_at=MAY1 + timedelta(days=2), status_code=502, outcome=Outcome.UPSTREAM_ERROR,
        usage_source=UsageSource.MISSING, error="upstream said no",
    ),
    "anon": make_record(
        key_fingerprint=None, key_suffix=None, team="", requested_model=None,
        started_at=MAY1 + timedelta(hours=2), status_code=400, outcome=Outcome.PROXY_ERROR,
        usage_source=UsageSource.MISSING,
    ),
}  # fmt: skip


@pytest.fixture
async def loaded(db_engine: AsyncEngine) -> AsyncEngine:
    await write_batch(db_engine, list(DATASET.values()))
    return db_engine


def totals(**values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "requests": 0,
        "prompt_tokens": None,
        "completion_tokens": None,
        "cached_tokens": None,
        "reasoning_tokens": None,
        "total_tokens": None,
        "records_missing_usage": 0,
        "errors": 0,
    }
    base.update(values)
    return base


async def test_ungrouped_summary_is_one_totals_row(loaded: AsyncEngine) -> None:
    assert await usage_summary(loaded) == [
        totals(
            requests=6, prompt_tokens=117, completion_tokens=25, cached_tokens=50, reasoning_tokens=3,
            total_tokens=135, records_missing_usage=3, errors=3,
        )
    ]  # fmt: skip


async def test_empty_range_reports_zero_requests_and_no_token_counts(loaded: AsyncEngine) -> None:
    assert await usage_summary(loaded, since=datetime(2030, 1, 1, tzinfo=UTC)) == [totals()]
    assert await usage_summary(loaded, since=datetime(2030, 1, 1, tzinfo=UTC), group_by=["team"]) == []


async def test_group_by_key_reports_fingerprint_and_suffix(loaded: AsyncEngine) -> None:
    rows = await usage_summary(loaded, group_by=["key"])
    assert rows == [
        {"key_fingerprint": KEY_A, "key_suffix": "...aaaa", **totals(
            requests=3, prompt_tokens=110, completion_tokens=25, cached_tokens=50, reasoning_tokens=3,
            total_tokens=135, records_missing_usage=1, errors=1,
        )},
        # completion_tokens were never reported for key B: None, not 0.
        {"key_fingerprint": KEY_B, "key_suffix": "...bbbb", **totals(
            requests=2, prompt_tokens=7, records_missing_usage=1, errors=1,
        )},
        {"key_fingerprint": None, "key_suffix": None, **totals(
            requests=1, records_missing_usage=1, errors=1,
        )},
    ]  # fmt: skip


async def test_group_by_team_and_model(loaded: AsyncEngine) -> None:
    rows = await usage_summary(loaded, group_by=["team", "model"])
    assert [(r["team"], r["requested_model"], r["requests"], r["prompt_tokens"]) for r in rows] == [
        ("", None, 1, None),
        ("ads", "mixtral", 2, 7),
        ("search", "llama", 3, 110),
    ]
    assert list(rows[0]) == ["team", "requested_model", *totals()]


async def test_group_by_day_uses_the_utc_date(loaded: AsyncEngine) -> None:
    rows = await usage_summary(loaded, group_by=["day"])
    assert [(r["day"], r["requests"], r["prompt_tokens"], r["errors"]) for r in rows] == [
        ("2024-05-01", 3, 110, 1),  # a1, a2 (00:30 +02:00), anon
        ("2024-05-02", 2, 7, 1),  # a3 (20:00 -05:00), b1
        ("2024-05-03", 1, None, 1),  # b2
    ]


async def test_group_by_day_and_endpoint(loaded: AsyncEngine) -> None:
    rows = await usage_summary(loaded, group_by=["day", "endpoint"])
    assert [(r["day"], r["endpoint"], r["requests"]) for r in rows] == [
        ("2024-05-01", "/v1/chat/completions", 3),
        ("2024-05-02", "/v1/chat/completions", 1),
        ("2024-05-02", "/v1/completions", 1),
        ("2024-05-03", "/v1/chat/completions", 1),
    ]


async def test_filters_narrow_before_grouping(loaded: AsyncEngine) -> None:
    by_team = await usage_summary(loaded, team="search", group_by=["model"])
    assert [(r["requested_model"], r["requests"]) for r in by_team] == [("llama", 3)]
    by_key = await usage_summary(loaded, key_fingerprint=KEY_B)
    assert by_key[0]["requests"] == 2
    by_model = await usage_summary(loaded, model="mixtral", endpoint="/v1/completions")
    assert by_model[0]["requests"] == 1 and by_model[0]["prompt_tokens"] == 7


async def test_time_range_is_half_open_and_naive_times_are_utc(loaded: AsyncEngine) -> None:
    # since is inclusive (a1 is exactly at MAY1), until exclusive (b1 is exactly at the bound).
    rows = await usage_summary(loaded, since=MAY1, until=MAY1 + timedelta(days=1, hours=1))
    assert rows[0]["requests"] == 4  # a1, a2, a3, anon
    naive = await usage_summary(loaded, since=MAY1.replace(tzinfo=None), until=datetime(2024, 5, 2, 13))
    assert naive == rows
    shifted = await usage_summary(loaded, since=MAY1.astimezone(PLUS2))  # same instant, other zone
    assert shifted[0]["requests"] == 6


async def test_group_by_rejects_unknown_keys(loaded: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="unknown group_by"):
        await usage_summary(loaded, group_by=["team", "colour"])
    assert GROUPS == ("key", "team", "model", "endpoint", "day")


async def test_recent_requests_newest_first_with_limit(loaded: AsyncEngine) -> None:
    rows = await recent_requests(loaded, limit=3)
    assert [r["event_id"] for r in rows] == [
        DATASET["b2_error"].event_id,
        DATASET["b1"].event_id,
        DATASET["a3_missing"].event_id,
    ]
    assert rows[0]["started_at"] == "2024-05-03T12:00:00+00:00"
    assert rows[0]["outcome"] == "upstream_error" and rows[0]["error"] == "upstream said no"


async def test_recent_requests_are_json_serialisable_with_every_field(loaded: AsyncEngine) -> None:
    rows = await recent_requests(loaded)
    assert len(rows) == 6
    assert json.loads(json.dumps(rows)) == rows
    a3 = next(r for r in rows if r["event_id"] == DATASET["a3_missing"].event_id)
    assert a3["started_at"] == "2024-05-02T01:00:00+00:00"
    assert a3["stream"] is True and a3["prompt_tokens"] is None and a3["upstream_metrics"] == {}
    assert set(a3) == {f for f in UsageRecord.__dataclass_fields__}


async def test_recent_requests_filters(loaded: AsyncEngine) -> None:
    def ids(rows: list[dict[str, Any]]) -> set[str]:
        return {r["event_id"] for r in rows}

    assert ids(await recent_requests(loaded, key_fingerprint=KEY_B)) == {
        DATASET["b1"].event_id,
        DATASET["b2_error"].event_id,
    }
    assert ids(await recent_requests(loaded, model="llama", outcome=Outcome.ABORTED)) == {
        DATASET["a3_missing"].event_id
    }
    assert ids(await recent_requests(loaded, outcome="proxy_error")) == {DATASET["anon"].event_id}
    assert ids(await recent_requests(loaded, since=MAY1 + timedelta(days=2))) == {
        DATASET["b2_error"].event_id
    }
    with pytest.raises(ValueError, match="limit"):
        await recent_requests(loaded, limit=0)
