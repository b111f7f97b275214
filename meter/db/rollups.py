"""The hourly rollup (``usage_hourly``) and raw-event retention: what keeps reports and budgets
fast however many raw events there are, and lets old raw events go.

Invariants:

Rule 1: exactly once. The rollup is updated in the transaction that inserts the raw rows, from the
        rows INSERT ... RETURNING says were new (meter.db.insert). A replayed record is not new, so
        it adds nothing; a rolled-back insert rolls its rollup update back with it.
Rule 2: one aggregation, :func:`rollup_upsert_sql`, for every backend and path, written with the
        same SQL functions the raw report uses (meter.db.queries): per group ``requests``,
        ``errors`` (outcome != 'ok'), ``records_missing_usage``, and per token field ``SUM`` and
        ``COUNT`` (records that reported it), so a sum over records that reported nothing stays
        "not reported" rather than 0; ``cost_nanos`` summed (integer nano-USD) and
        ``unpriced_requests`` counted (records with tokens and no cost), so billing reads exact sums.
        Re-rating adjusts both by differences (meter.billing.ledger).
Rule 3: hours are UTC, in the form each backend stores timestamps (meter.db.types); the key
        columns encode NULL as ``''`` plus a ``null_dims`` bit (meter.db.models, Rule 6).
Rule 4: rows are upserted in key order, so writers updating the same rollup rows (two batches in
        flight, or replicas sharing a database) take their row locks in the same order and cannot
        deadlock each other.
Rule 5: retention deletes raw events only, in bounded chunks (one short transaction each); the
        rollup keeps their sums for good.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.models import usage_events

NULL_KEY = 1  # null_dims bit: the record had no key fingerprint
NULL_MODEL = 2  # null_dims bit: the record had no requested model
KEY_COLUMNS: tuple[str, ...] = ("hour", "team", "key_fingerprint", "requested_model", "endpoint", "null_dims")
TOKEN_COLUMNS: tuple[str, ...] = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
)
SUM_COLUMNS: tuple[str, ...] = (
    "requests",
    "errors",
    "records_missing_usage",
    *(column for name in TOKEN_COLUMNS for column in (name, f"{name}_records")),
    "cost_nanos",
    "unpriced_requests",
)
# The usage_events columns the aggregation reads.
ROLLUP_INPUTS: tuple[str, ...] = (
    "started_at",
    "team",
    "key_fingerprint",
    "key_suffix",
    "requested_model",
    "endpoint",
    "outcome",
    "usage_source",
    *TOKEN_COLUMNS,
    "cost_nanos",
)
# A record that used tokens but has no cost (meter.billing.rating, Rule 3).
UNPRICED_SQL = (
    "cost_nanos IS NULL AND (prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL"
    " OR total_tokens IS NOT NULL)"
)
# The start of started_at's UTC hour, in the form each backend stores timestamps (Rule 3).
HOUR_SQL = {
    "postgresql": "date_trunc('hour', started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
    "sqlite": "substr(started_at, 1, 13) || ':00:00.000000'",
}
DEFAULT_RETENTION_CHUNK = 5_000


def rollup_upsert_sql(dialect_name: str, source: str) -> str:
    """``INSERT INTO usage_hourly ... SELECT <aggregates> FROM {source} ... ON CONFLICT DO UPDATE``.

    ``source`` is SQL naming rows with the :data:`ROLLUP_INPUTS` columns: a CTE of freshly inserted
    rows, or ``usage_events WHERE ...``. Works on PostgreSQL and SQLite (Rule 2).
    """
    try:
        hour = HOUR_SQL[dialect_name]
    except KeyError:
        raise NotImplementedError(f"no usage_hourly rollup for the {dialect_name} dialect") from None
    keys = ", ".join(KEY_COLUMNS)
    positions = ", ".join(str(i) for i in range(1, len(KEY_COLUMNS) + 1))
    tokens = ", ".join(f"COALESCE(SUM({name}), 0), COUNT({name})" for name in TOKEN_COLUMNS)
    merge = ",\n                ".join(
        f"{name} = usage_hourly.{name} + excluded.{name}" for name in SUM_COLUMNS
    )
    # max(old, new) ignoring NULLs, written portably (SQLite's two-argument max() returns NULL).
    suffix = (
        "key_suffix = CASE WHEN usage_hourly.key_suffix IS NULL"
        " OR excluded.key_suffix > usage_hourly.key_suffix"
        " THEN excluded.key_suffix ELSE usage_hourly.key_suffix END"
    )
    return f"""
        INSERT INTO usage_hourly ({keys}, key_suffix, {", ".join(SUM_COLUMNS)})
        SELECT {hour},
               team,
               COALESCE(key_fingerprint, ''),
               COALESCE(requested_model, ''),
               endpoint,
               (CASE WHEN key_fingerprint IS NULL THEN {NULL_KEY} ELSE 0 END)
                 + (CASE WHEN requested_model IS NULL THEN {NULL_MODEL} ELSE 0 END),
               MAX(key_suffix),
               COUNT(*),
               SUM(CASE WHEN outcome <> 'ok' THEN 1 ELSE 0 END),
               SUM(CASE WHEN usage_source = 'missing' THEN 1 ELSE 0 END),
               {tokens},
               COALESCE(SUM(cost_nanos), 0),
               SUM(CASE WHEN {UNPRICED_SQL} THEN 1 ELSE 0 END)
        FROM {source}
        GROUP BY {positions}
        ORDER BY {positions}
        ON CONFLICT ({keys}) DO UPDATE SET
                {merge},
                {suffix}
    """


def hour_of(moment: datetime) -> datetime:
    """The start of the UTC hour containing ``moment`` (naive means UTC), as an aware datetime."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.replace(minute=0, second=0, microsecond=0)


def is_hour_aligned(moment: datetime | None) -> bool:
    """True for None (an open end) and for the exact start of a UTC hour."""
    if moment is None:
        return True
    return hour_of(moment) == (moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment)


async def delete_events_before(
    engine: AsyncEngine, cutoff: datetime, *, chunk: int = DEFAULT_RETENTION_CHUNK
) -> int:
    """Delete raw events that started before ``cutoff``, ``chunk`` rows per transaction (Rule 5).
    Returns how many were deleted. The rollup is untouched."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    t = usage_events.c
    oldest: Select[Any] = select(t.event_id).where(t.started_at < cutoff).limit(chunk)
    stmt = delete(usage_events).where(t.event_id.in_(oldest.scalar_subquery()))
    total = 0
    while True:
        async with engine.begin() as conn:
            deleted = (await conn.execute(stmt)).rowcount
        total += deleted
        if deleted < chunk:
            return total
