"""Read-side queries behind ``meter report`` and the admin API: usage totals and recent requests.

Invariants:

Rule 1: "not reported is not zero". Token totals are SQL ``SUM``s, which skip NULLs; a group in
        which no record reported a count returns ``None`` for it, not 0. ``records_missing_usage``
        says how many records in the group had nothing to go on.
Rule 2: results are identical on SQLite and PostgreSQL: integers are ``int`` (PostgreSQL returns
        ``SUM(bigint)`` as NUMERIC), days are UTC dates as ``'YYYY-MM-DD'``, NULL group values sort
        last, and every value is JSON-serialisable (datetimes as ISO 8601 strings).
Rule 3: time ranges are half-open: ``since <= started_at < until``. Naive datetimes are UTC.

Failure policy: database errors propagate; a report that cannot be computed must say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, case, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.models import usage_events
from meter.db.types import utc_day
from meter.records import Outcome, UsageSource

GROUPS: tuple[str, ...] = ("key", "team", "model", "endpoint", "day")
TOKEN_COLUMNS: tuple[str, ...] = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
)

_t = usage_events.c


def _group_columns(group_by: Sequence[str]) -> tuple[list[ColumnElement[Any]], list[ColumnElement[Any]]]:
    """(columns to select, expressions to GROUP BY) for the requested grouping keys, in order."""
    unknown = [key for key in group_by if key not in GROUPS]
    if unknown:
        raise ValueError(f"unknown group_by key(s) {unknown}; choose from {list(GROUPS)}")
    selected: list[ColumnElement[Any]] = []
    grouped: list[ColumnElement[Any]] = []
    for key in dict.fromkeys(group_by):  # de-duplicated, order kept
        if key == "key":
            # The suffix is a display aid derived from the key; aggregate it so a group is one key.
            selected += [_t.key_fingerprint, func.max(_t.key_suffix).label("key_suffix")]
            grouped.append(_t.key_fingerprint)
        elif key == "team":
            selected.append(_t.team)
            grouped.append(_t.team)
        elif key == "model":
            selected.append(_t.requested_model)
            grouped.append(_t.requested_model)
        elif key == "endpoint":
            selected.append(_t.endpoint)
            grouped.append(_t.endpoint)
        else:
            day = utc_day(_t.started_at)
            selected.append(day.label("day"))
            grouped.append(day)
    return selected, grouped


def _time_range(stmt: Select[Any], since: datetime | None, until: datetime | None) -> Select[Any]:
    if since is not None:
        stmt = stmt.where(_t.started_at >= since)
    if until is not None:
        stmt = stmt.where(_t.started_at < until)
    return stmt


async def usage_summary(
    engine: AsyncEngine,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    group_by: Sequence[str] = (),
    key_fingerprint: str | None = None,
    team: str | None = None,
    model: str | None = None,
    endpoint: str | None = None,
) -> list[dict[str, Any]]:
    """Usage totals per group, ordered by the group columns.

    ``group_by`` is a subset of :data:`GROUPS`: ``key`` yields ``key_fingerprint`` and
    ``key_suffix``, ``model`` the requested model, ``day`` the UTC date. With no grouping the result
    is a single totals row (``requests`` may be 0). ``model`` filters on the requested model.
    Each row then has ``requests``, the five token sums (``None`` if nothing was reported),
    ``records_missing_usage`` and ``errors`` (records whose outcome is not ``ok``).
    """
    selected, grouped = _group_columns(group_by)
    metrics: list[ColumnElement[Any]] = [
        func.count().label("requests"),
        *(func.sum(_t[name]).label(name) for name in TOKEN_COLUMNS),
        func.count(case((_t.usage_source == UsageSource.MISSING.value, 1))).label("records_missing_usage"),
        func.count(case((_t.outcome != Outcome.OK.value, 1))).label("errors"),
    ]
    stmt = _time_range(select(*selected, *metrics), since, until)
    for column, value in (
        (_t.key_fingerprint, key_fingerprint),
        (_t.team, team),
        (_t.requested_model, model),
        (_t.endpoint, endpoint),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    if grouped:
        stmt = stmt.group_by(*grouped).order_by(*(expr.asc().nulls_last() for expr in grouped))
    async with engine.connect() as conn:
        result = await conn.execute(stmt)
        rows = [dict(row._mapping) for row in result]
    for row in rows:
        for name in (*TOKEN_COLUMNS, "requests", "records_missing_usage", "errors"):
            if row[name] is not None:
                row[name] = int(row[name])  # PostgreSQL: SUM(bigint) is NUMERIC -> Decimal
    return rows


async def recent_requests(
    engine: AsyncEngine,
    *,
    limit: int = 100,
    key_fingerprint: str | None = None,
    model: str | None = None,
    outcome: Outcome | str | None = None,
    since: datetime | None = None,
) -> list[dict[str, Any]]:
    """The newest ``limit`` records (every column), newest first; ``model`` is the requested model."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    stmt = _time_range(select(usage_events), since, None)
    if key_fingerprint is not None:
        stmt = stmt.where(_t.key_fingerprint == key_fingerprint)
    if model is not None:
        stmt = stmt.where(_t.requested_model == model)
    if outcome is not None:
        stmt = stmt.where(_t.outcome == str(outcome))
    # event_id breaks ties: its leading digits are the millisecond clock (meter.records.new_event_id).
    stmt = stmt.order_by(_t.started_at.desc(), _t.event_id.desc()).limit(limit)
    async with engine.connect() as conn:
        result = await conn.execute(stmt)
        return [_jsonable(dict(row._mapping)) for row in result]


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    started_at = row["started_at"]
    if isinstance(started_at, datetime):
        row["started_at"] = started_at.isoformat()
    row["upstream_metrics"] = dict(row["upstream_metrics"] or {})
    return row
