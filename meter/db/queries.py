"""Read-side queries behind ``meter report`` and the admin API: usage totals and recent requests.

Invariants:

Rule 1: "not reported is not zero". Token totals are SQL ``SUM``s, which skip NULLs; a group in
        which no record reported a count returns ``None`` for it, not 0. ``records_missing_usage``
        says how many records in the group had nothing to go on.
Rule 2: results are identical on SQLite and PostgreSQL: integers are ``int`` (PostgreSQL returns
        ``SUM(bigint)`` as NUMERIC), days are UTC dates as ``'YYYY-MM-DD'``, NULL group values sort
        last, and every value is JSON-serialisable (datetimes as ISO 8601 strings).
Rule 3: time ranges are half-open: ``since <= started_at < until``. Naive datetimes are UTC.
Rule 4: :func:`usage_summary` reads the hourly rollup (``usage_hourly``, meter.db.rollups) whenever
        both ends of the range are on a UTC hour boundary or open, which every grouping and filter
        it offers allows; it never scans raw events then. Other ranges are summed from raw events.
        The two give identical results for the same events (tests/db/test_rollups.py checks it). Once
        retention has deleted old raw events, only the rollup still knows their hours.

Failure policy: database errors propagate; a report that cannot be computed must say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Select, and_, case, func, literal_column, null, select
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.models import usage_events, usage_hourly
from meter.db.rollups import NULL_KEY, NULL_MODEL, is_hour_aligned
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
_h = usage_hourly.c
SummarySource = Literal["auto", "raw", "rollup"]
# Literals, not bound parameters: these appear in GROUP BY, where PostgreSQL needs the selected
# expression to be textually the grouped one.
_ZERO: ColumnElement[Any] = literal_column("0")


def _bit(mask: int) -> ColumnElement[Any]:
    return _h.null_dims.op("&")(literal_column(str(int(mask))))


class _Dimensions:
    """The group and filter columns of one source table, under the names reports use."""

    def __init__(self, *, rollup: bool) -> None:
        self.rollup = rollup
        if rollup:
            # Decode the rollup's NULL encoding (meter.db.models, Rule 6) back to NULL.
            self.key_fingerprint: ColumnElement[Any] = case(
                (_bit(NULL_KEY) != _ZERO, null()), else_=_h.key_fingerprint
            )
            self.requested_model: ColumnElement[Any] = case(
                (_bit(NULL_MODEL) != _ZERO, null()), else_=_h.requested_model
            )
            self.key_suffix: ColumnElement[Any] = _h.key_suffix
            self.team: ColumnElement[Any] = _h.team
            self.endpoint: ColumnElement[Any] = _h.endpoint
            self.time: ColumnElement[Any] = _h.hour
        else:
            self.key_fingerprint = _t.key_fingerprint
            self.requested_model = _t.requested_model
            self.key_suffix = _t.key_suffix
            self.team = _t.team
            self.endpoint = _t.endpoint
            self.time = _t.started_at

    def key_is(self, value: str) -> ColumnElement[bool]:
        if not self.rollup:
            return _t.key_fingerprint == value
        # Compare the stored column, so its index serves, and require "not NULL" explicitly.
        return and_(_h.key_fingerprint == value, _bit(NULL_KEY) == _ZERO)

    def model_is(self, value: str) -> ColumnElement[bool]:
        if not self.rollup:
            return _t.requested_model == value
        return and_(_h.requested_model == value, _bit(NULL_MODEL) == _ZERO)


def _group_columns(
    group_by: Sequence[str], dims: _Dimensions
) -> tuple[list[ColumnElement[Any]], list[ColumnElement[Any]]]:
    """(columns to select, expressions to GROUP BY) for the requested grouping keys, in order."""
    unknown = [key for key in group_by if key not in GROUPS]
    if unknown:
        raise ValueError(f"unknown group_by key(s) {unknown}; choose from {list(GROUPS)}")
    selected: list[ColumnElement[Any]] = []
    grouped: list[ColumnElement[Any]] = []
    for key in dict.fromkeys(group_by):  # de-duplicated, order kept
        if key == "key":
            # The suffix is a display aid derived from the key; aggregate it so a group is one key.
            selected += [
                dims.key_fingerprint.label("key_fingerprint"),
                func.max(dims.key_suffix).label("key_suffix"),
            ]
            grouped.append(dims.key_fingerprint)
        elif key == "team":
            selected.append(dims.team.label("team"))
            grouped.append(dims.team)
        elif key == "model":
            selected.append(dims.requested_model.label("requested_model"))
            grouped.append(dims.requested_model)
        elif key == "endpoint":
            selected.append(dims.endpoint.label("endpoint"))
            grouped.append(dims.endpoint)
        else:
            day = utc_day(dims.time)
            selected.append(day.label("day"))
            grouped.append(day)
    return selected, grouped


def _raw_metrics() -> list[ColumnElement[Any]]:
    return [
        func.count().label("requests"),
        *(func.sum(_t[name]).label(name) for name in TOKEN_COLUMNS),
        func.count(case((_t.usage_source == UsageSource.MISSING.value, 1))).label("records_missing_usage"),
        func.count(case((_t.outcome != Outcome.OK.value, 1))).label("errors"),
    ]


def _rollup_metrics() -> list[ColumnElement[Any]]:
    # Over no rows SUM is NULL where the raw COUNT is 0; a token sum is None unless some record
    # in the group reported that field (Rule 1).
    return [
        func.coalesce(func.sum(_h.requests), 0).label("requests"),
        *(
            case((func.sum(_h[f"{name}_records"]) > 0, func.sum(_h[name])), else_=null()).label(name)
            for name in TOKEN_COLUMNS
        ),
        func.coalesce(func.sum(_h.records_missing_usage), 0).label("records_missing_usage"),
        func.coalesce(func.sum(_h.errors), 0).label("errors"),
    ]


def _time_range(
    stmt: Select[Any],
    since: datetime | None,
    until: datetime | None,
    column: ColumnElement[Any] = _t.started_at,
) -> Select[Any]:
    if since is not None:
        stmt = stmt.where(column >= since)
    if until is not None:
        stmt = stmt.where(column < until)
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
    source: SummarySource = "auto",
) -> list[dict[str, Any]]:
    """Usage totals per group, ordered by the group columns.

    ``group_by`` is a subset of :data:`GROUPS`: ``key`` yields ``key_fingerprint`` and
    ``key_suffix``, ``model`` the requested model, ``day`` the UTC date. With no grouping the result
    is a single totals row (``requests`` may be 0). ``model`` filters on the requested model.
    Each row then has ``requests``, the five token sums (``None`` if nothing was reported),
    ``records_missing_usage`` and ``errors`` (records whose outcome is not ``ok``).

    ``source`` picks the table (Rule 4): ``"auto"`` uses the hourly rollup when ``since`` and
    ``until`` are hour-aligned or open; ``"rollup"`` insists (``ValueError`` for an unaligned
    range); ``"raw"`` always sums raw events.
    """
    aligned = is_hour_aligned(since) and is_hour_aligned(until)
    if source == "rollup" and not aligned:
        raise ValueError("the hourly rollup answers only ranges whose ends are on a UTC hour boundary")
    if source not in ("auto", "raw", "rollup"):
        raise ValueError(f"unknown source {source!r}; choose auto, raw or rollup")
    rollup = source == "rollup" or (source == "auto" and aligned)
    dims = _Dimensions(rollup=rollup)
    selected, grouped = _group_columns(group_by, dims)
    metrics = _rollup_metrics() if rollup else _raw_metrics()
    stmt = _time_range(select(*selected, *metrics), since, until, dims.time)
    if key_fingerprint is not None:
        stmt = stmt.where(dims.key_is(key_fingerprint))
    if model is not None:
        stmt = stmt.where(dims.model_is(model))
    if team is not None:
        stmt = stmt.where(dims.team == team)
    if endpoint is not None:
        stmt = stmt.where(dims.endpoint == endpoint)
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
