"""``period_spend`` on SQLite and PostgreSQL: a subject's spend in a budget period, read back from the
``usage_hourly`` rollups the writer maintains (team by team name, key by fingerprint; hours that
overlap the period; exact money; "not reported" never counted as usage that was not there)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.insert import write_batch
from meter.quota.periods import period_window
from meter.quota.policy import Subject
from meter.quota.seeding import period_spend
from meter.quota.spend import Spend
from meter.records import UsageRecord, UsageSource
from tests.conftest_db import make_record

KEY_A, KEY_B = "a" * 64, "b" * 64
NOV = datetime(2026, 11, 1, tzinfo=UTC)
DEC = datetime(2026, 12, 1, tzinfo=UTC)


def usage(at: datetime, *, team: str = "search", key: str | None = KEY_A, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "cost_nanos": 1_000_000_001,  # 1.000000001 USD: sums stay exact to the nano-USD
        "price_ref": "db:1",
    }
    values.update(fields)
    return make_record(started_at=at, team=team, key_fingerprint=key, key_suffix="...aaaa", **values)


async def spend(engine: AsyncEngine, subject: Subject, start: datetime, end: datetime) -> Spend:
    async with engine.connect() as conn:
        return await period_spend(conn, subject, start, end)


async def test_a_teams_and_a_keys_spend_of_a_month(db_engine: AsyncEngine) -> None:
    await write_batch(
        db_engine,
        [
            usage(NOV + timedelta(hours=1, minutes=5)),
            usage(NOV + timedelta(days=12, minutes=59, seconds=59)),
            usage(DEC - timedelta(microseconds=1), key=KEY_B),  # the month's last instant
            usage(NOV - timedelta(microseconds=1)),  # October: not counted
            usage(DEC),  # December: not counted
            usage(NOV + timedelta(days=3), team="ads", key=KEY_B),  # another team
            usage(NOV + timedelta(days=4), key=None),  # no key: the team's, no key's
        ],
    )
    team = await spend(db_engine, Subject("team", "search"), NOV, DEC)
    assert team == Spend(400, 80, 480, Decimal("4.000000004"))
    assert team.cost_micros == 4_000_000  # settled spend rounds to the nearest micro-USD (spend Rule 1)

    assert await spend(db_engine, Subject("key", KEY_A), NOV, DEC) == Spend(
        200, 40, 240, Decimal("2.000000002")
    )
    assert await spend(db_engine, Subject("key", KEY_B), NOV, DEC) == Spend(
        200, 40, 240, Decimal("2.000000002")
    )
    assert await spend(db_engine, Subject("team", "ads"), NOV, DEC) == Spend(
        100, 20, 120, Decimal("1.000000001")
    )
    nothing = await spend(db_engine, Subject("team", "nobody"), NOV, DEC)
    assert nothing == Spend() and nothing.cost_usd == 0


async def test_unpriced_and_partly_reported_usage(db_engine: AsyncEngine) -> None:
    at = NOV + timedelta(hours=2)
    await write_batch(
        db_engine,
        [
            usage(at, cost_nanos=None, price_ref=None),  # unpriced: tokens count, no cost
            usage(at, total_tokens=None),  # parts reported, total not: the parts count
            usage(
                at,
                prompt_tokens=None,
                completion_tokens=None,
                total_tokens=None,
                cost_nanos=None,
                price_ref=None,
                usage_source=UsageSource.MISSING,
            ),  # nothing reported: nothing added
            usage(at, prompt_tokens=7, completion_tokens=None, total_tokens=7, cost_nanos=5),  # embeddings
        ],
    )
    got = await spend(db_engine, Subject("team", "search"), NOV, DEC)
    assert got == Spend(207, 40, 247, Decimal("1.000000006"))


async def test_a_period_not_on_the_hour_counts_the_hours_across_its_bounds(db_engine: AsyncEngine) -> None:
    # A day in Asia/Kolkata (UTC+05:30) runs from 18:30 to 18:30 UTC; rollups hold whole UTC hours.
    tz = ZoneInfo("Asia/Kolkata")
    start, end = period_window("day", datetime(2026, 11, 10, 12, 0, tzinfo=UTC), tz)
    assert start.astimezone(UTC) == datetime(2026, 11, 9, 18, 30, tzinfo=UTC)
    await write_batch(
        db_engine,
        [
            usage(
                datetime(2026, 11, 9, 17, 59, 59, tzinfo=UTC),
                prompt_tokens=1,
                completion_tokens=0,
                total_tokens=1,
            ),  # the hour before: not counted
            usage(
                datetime(2026, 11, 9, 18, 10, tzinfo=UTC),
                prompt_tokens=10,
                completion_tokens=0,
                total_tokens=10,
            ),  # the previous local day, in the hour the period starts in: counted
            usage(
                datetime(2026, 11, 10, 3, 0, tzinfo=UTC),
                prompt_tokens=100,
                completion_tokens=0,
                total_tokens=100,
            ),
            usage(
                datetime(2026, 11, 10, 18, 45, tzinfo=UTC),
                prompt_tokens=1000,
                completion_tokens=0,
                total_tokens=1000,
            ),  # the next local day, in the hour the period ends in: counted
            usage(
                datetime(2026, 11, 10, 19, 0, tzinfo=UTC),
                prompt_tokens=10000,
                completion_tokens=0,
                total_tokens=10000,
            ),  # the hour after: not counted
        ],
    )
    got = await spend(db_engine, Subject("team", "search"), start, end)
    assert got.prompt_tokens == 1110
    # The same instants given in UTC, or with the end "now" inside an hour, read the same hours.
    assert (
        await spend(db_engine, Subject("team", "search"), start.astimezone(UTC), end.astimezone(UTC)) == got
    )
    now = datetime(2026, 11, 10, 3, 20, tzinfo=UTC)
    assert (await spend(db_engine, Subject("team", "search"), start, now)).prompt_tokens == 110


async def test_bounds_must_be_aware(db_engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await spend(db_engine, Subject("team", "search"), datetime(2026, 11, 1), DEC)
    with pytest.raises(ValueError, match="timezone-aware"):
        await spend(db_engine, Subject("team", "search"), NOV, datetime(2026, 12, 1))
