"""Usage records for the rollup tests (meter.db.rollups), and their check: the hourly rollup answers
every report exactly as the raw events do."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.queries import GROUPS, usage_summary
from meter.records import Outcome, UsageRecord, UsageSource
from tests.conftest_db import make_record

START = datetime(2024, 5, 1, 0, 0, tzinfo=UTC)
KEYS = [("a" * 64, "...aaaa"), ("b" * 64, "...bbbb"), ("c" * 64, None), (None, None)]
TEAMS = ["search", "ads", ""]
MODELS = ["llama", "mixtral", "", None]  # "" (a client sent an empty name) is not None
ENDPOINTS = ["/v1/chat/completions", "/v1/completions"]
ZONES = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-7))]


def dataset(count: int, seed: int = 1) -> list[UsageRecord]:
    """Records spread over three days and every kind of dimension and token value."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        key, suffix = rng.choice(KEYS)
        moment = START + timedelta(seconds=rng.randrange(3 * 86400), microseconds=rng.randrange(10**6))
        missing = rng.random() < 0.15

        def tokens(missing: bool = missing) -> int | None:
            return None if missing or rng.random() < 0.2 else rng.randrange(0, 5000)

        out.append(
            make_record(
                started_at=moment.astimezone(rng.choice(ZONES)),
                key_fingerprint=key,
                key_suffix=suffix if rng.random() < 0.9 else None,
                team=rng.choice(TEAMS),
                requested_model=rng.choice(MODELS),
                endpoint=rng.choice(ENDPOINTS),
                outcome=rng.choice(list(Outcome)),
                usage_source=UsageSource.MISSING
                if missing
                else rng.choice([UsageSource.REPORTED, UsageSource.ESTIMATED]),
                prompt_tokens=tokens(),
                completion_tokens=tokens(),
                cached_tokens=tokens(),
                reasoning_tokens=tokens(),
                total_tokens=tokens(),
            )
        )
    return out


async def assert_rollup_equals_raw(engine: AsyncEngine, **filters: Any) -> None:
    """usage_summary from the rollup equals usage_summary from raw events, for every grouping."""
    for size in range(len(GROUPS) + 1):
        for groups in itertools.combinations(GROUPS, size):
            raw = await usage_summary(engine, group_by=groups, source="raw", **filters)
            rolled = await usage_summary(engine, group_by=groups, source="rollup", **filters)
            assert rolled == raw, f"group_by={groups} filters={filters}"
