"""Billing over stored usage: per-team reports and re-rating after a price correction.

Rule 1 (exact): reports add integer ``cost_nanos`` (meter.billing.rating, Rule 1). A report's lines come
        from ``usage_hourly`` when its range is hour-aligned (months and days always are), else from
        raw events; both hold the same integer sums, so the total equals the sum of the per-request
        costs of the records in the range.
Rule 2 (attribution is history): lines group by the team stored on each record at request time.
Rule 3 (rerate): :func:`rerate` recomputes ``cost_nanos``/``price_ref`` of the raw events in
        ``[since, until)`` with the current catalog and, in the same transaction per chunk, adds the
        differences to the ``usage_hourly`` rows those events were summed into. Rows whose values do
        not change are not written, so running it twice changes nothing the second time. Rows are
        locked as read (``FOR UPDATE`` on PostgreSQL; SQLite has one writer), so two concurrent
        runs cannot both apply the same difference.
Rule 4: raw events removed by retention can no longer be re-rated; their hourly sums stay as priced.

Failure policy: database errors propagate; each chunk of a rerate commits on its own, so an
interrupted run leaves a consistent prefix and can simply be run again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    case,
    func,
    literal_column,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.billing.rating import (
    PERIODS,
    BillingLine,
    BillingReport,
    PricedCatalog,
    UsageView,
    Usd,
    has_usage,
    merge_lines,
    price_record,
    usd,
)
from meter.db.models import usage_events, usage_hourly
from meter.db.rollups import NULL_KEY, NULL_MODEL, hour_of, is_hour_aligned
from meter.db.types import utc_day
from meter.records import Usage
from meter.tenancy.audit import record_change

_t = usage_events.c
_h = usage_hourly.c
TOKENS: tuple[str, ...] = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
_ZERO: ColumnElement[Any] = literal_column("0")
DEFAULT_CHUNK = 2_000


def _int(value: Any) -> int | None:
    return None if value is None else int(value)  # PostgreSQL: SUM(bigint) is NUMERIC


def _rollup_report(since: datetime | None, until: datetime | None) -> Select[Any]:
    model = case(
        (_h.null_dims.op("&")(literal_column(str(NULL_MODEL))) != _ZERO, null()), else_=_h.requested_model
    )
    day = utc_day(_h.hour)
    stmt = select(
        day.label("day"),
        _h.team.label("team"),
        model.label("model"),
        func.sum(_h.requests).label("requests"),
        *(
            case((func.sum(_h[f"{name}_records"]) > 0, func.sum(_h[name])), else_=null()).label(name)
            for name in TOKENS
        ),
        func.sum(_h.cost_nanos).label("cost_nanos"),
        func.sum(_h.unpriced_requests).label("unpriced_requests"),
    )
    if since is not None:
        stmt = stmt.where(_h.hour >= since)
    if until is not None:
        stmt = stmt.where(_h.hour < until)
    return stmt.group_by(day, _h.team, model)


def unpriced_condition() -> ColumnElement[bool]:
    """A raw event that used tokens but has no cost (meter.billing.rating, Rule 3)."""
    return and_(
        _t.cost_nanos.is_(None),
        or_(_t.prompt_tokens.is_not(None), _t.completion_tokens.is_not(None), _t.total_tokens.is_not(None)),
    )


def _raw_report(since: datetime | None, until: datetime | None) -> Select[Any]:
    day = utc_day(_t.started_at)
    stmt = select(
        day.label("day"),
        _t.team.label("team"),
        _t.requested_model.label("model"),
        func.count().label("requests"),
        *(func.sum(_t[name]).label(name) for name in TOKENS),
        func.coalesce(func.sum(_t.cost_nanos), 0).label("cost_nanos"),
        func.count(case((unpriced_condition(), 1))).label("unpriced_requests"),
    )
    if since is not None:
        stmt = stmt.where(_t.started_at >= since)
    if until is not None:
        stmt = stmt.where(_t.started_at < until)
    return stmt.group_by(day, _t.team, _t.requested_model)


async def billing_report(
    engine: AsyncEngine,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    period: str = "day",
    team: str | None = None,
    model: str | None = None,
) -> BillingReport:
    """Per team by requested model by ``period`` ("day" or "month", UTC): requests, tokens by type,
    cost and unpriced requests over ``[since, until)`` (Rule 1)."""
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
    rollup = is_hour_aligned(since) and is_hour_aligned(until)
    stmt = _rollup_report(since, until) if rollup else _raw_report(since, until)
    if team is not None:
        stmt = stmt.where((_h.team if rollup else _t.team) == team)
    if model is not None:
        if rollup:
            stmt = stmt.where(
                _h.requested_model == model, _h.null_dims.op("&")(literal_column(str(NULL_MODEL))) == _ZERO
            )
        else:
            stmt = stmt.where(_t.requested_model == model)
    async with engine.connect() as conn:
        rows = [row._mapping for row in await conn.execute(stmt)]
    lines = [
        BillingLine(
            period=str(m["day"]),
            team=m["team"],
            model=m["model"],
            requests=int(m["requests"] or 0),
            prompt_tokens=_int(m["prompt_tokens"]),
            completion_tokens=_int(m["completion_tokens"]),
            cached_tokens=_int(m["cached_tokens"]),
            reasoning_tokens=_int(m["reasoning_tokens"]),
            cost_nanos=int(m["cost_nanos"] or 0),
            unpriced_requests=int(m["unpriced_requests"] or 0),
        )
        for m in rows
        if m["requests"]
    ]
    return BillingReport(since=since, until=until, period=period, lines=merge_lines(lines, period))


# -- rerate ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class RerateChange:
    team: str
    model: str | None
    records: int = 0
    old_nanos: int = 0
    new_nanos: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "team": self.team,
            "model": self.model,
            "records": self.records,
            "old_cost_usd": str(usd(self.old_nanos)),
            "new_cost_usd": str(usd(self.new_nanos)),
            "delta_usd": str(usd(self.new_nanos - self.old_nanos)),
        }


@dataclass(slots=True)
class RerateResult:
    since: datetime | None
    until: datetime | None
    dry_run: bool
    examined: int = 0
    changed: int = 0  # records whose cost or price_ref changed
    newly_priced: int = 0  # were unpriced, now have a cost
    newly_unpriced: int = 0  # had a cost, now no row applies
    delta_nanos: int = 0  # new total - old total
    changes: dict[tuple[str, str | None], RerateChange] = field(default_factory=dict)

    @property
    def delta_usd(self) -> Usd:
        return usd(self.delta_nanos)

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "rerate",
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
            "dry_run": self.dry_run,
            "examined": self.examined,
            "changed": self.changed,
            "newly_priced": self.newly_priced,
            "newly_unpriced": self.newly_unpriced,
            "delta_usd": str(self.delta_usd),
            "changes": [
                change.to_json()
                for _, change in sorted(self.changes.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
            ],
        }


_READ_COLUMNS = (
    _t.event_id,
    _t.started_at,
    _t.team,
    _t.key_fingerprint,
    _t.requested_model,
    _t.response_model,
    _t.endpoint,
    _t.prompt_tokens,
    _t.completion_tokens,
    _t.cached_tokens,
    _t.total_tokens,
    _t.cost_nanos,
    _t.price_ref,
)
_UPDATE_EVENT = (
    update(usage_events)
    .where(_t.event_id == bindparam("b_event_id"))
    .values(cost_nanos=bindparam("b_cost"), price_ref=bindparam("b_ref"))
)
_UPDATE_HOURLY = (
    update(usage_hourly)
    .where(
        _h.hour == bindparam("b_hour"),
        _h.team == bindparam("b_team"),
        _h.key_fingerprint == bindparam("b_key"),
        _h.requested_model == bindparam("b_model"),
        _h.endpoint == bindparam("b_endpoint"),
        _h.null_dims == bindparam("b_null_dims"),
    )
    .values(
        cost_nanos=_h.cost_nanos + bindparam("b_cost_delta"),
        unpriced_requests=_h.unpriced_requests + bindparam("b_unpriced_delta"),
    )
)


async def rerate(
    engine: AsyncEngine,
    catalog: PricedCatalog,
    *,
    since: datetime | None,
    until: datetime | None,
    dry_run: bool = False,
    actor: str | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> RerateResult:
    """Re-price raw events in ``[since, until)`` with ``catalog`` (Rule 3); ``dry_run`` only reports.
    A run that changed something is audited as ``billing.rerate`` by ``actor``."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    result = RerateResult(since=since, until=until, dry_run=dry_run)
    await _rerate_chunks(engine, catalog, result, chunk)
    if actor is not None and result.changed and not dry_run:
        detail = result.to_json()
        detail.pop("changes")
        async with engine.begin() as conn:
            await record_change(
                conn, datetime.now(UTC), actor, "billing.rerate", "billing", detail, bump=False
            )
    return result


async def _rerate_chunks(
    engine: AsyncEngine, catalog: PricedCatalog, result: RerateResult, chunk: int
) -> None:
    since, until, dry_run = result.since, result.until, result.dry_run
    last_id = ""
    while True:
        stmt = select(*_READ_COLUMNS).where(_t.event_id > last_id)
        if since is not None:
            stmt = stmt.where(_t.started_at >= since)
        if until is not None:
            stmt = stmt.where(_t.started_at < until)
        stmt = stmt.order_by(_t.event_id).limit(chunk).with_for_update()
        async with engine.begin() as conn:
            rows = [row._mapping for row in await conn.execute(stmt)]
            if not rows:
                return
            last_id = rows[-1]["event_id"]
            event_updates, hourly_deltas = _plan(rows, catalog, result)
            if event_updates and not dry_run:
                await conn.execute(_UPDATE_EVENT, event_updates)
                hourly = _hourly_params(hourly_deltas)
                if hourly:
                    await conn.execute(_UPDATE_HOURLY, hourly)
        if len(rows) < chunk:
            return


def _plan(
    rows: Sequence[Any], catalog: PricedCatalog, result: RerateResult
) -> tuple[list[dict[str, Any]], dict[tuple[Any, ...], list[int]]]:
    updates: list[dict[str, Any]] = []
    deltas: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0])
    for m in rows:
        result.examined += 1
        view = UsageView(
            started_at=m["started_at"],
            requested_model=m["requested_model"],
            response_model=m["response_model"],
            usage=Usage(
                prompt_tokens=m["prompt_tokens"],
                completion_tokens=m["completion_tokens"],
                cached_tokens=m["cached_tokens"],
                total_tokens=m["total_tokens"],
            ),
        )
        new_cost, new_ref = price_record(view, catalog)
        old_cost = _int(m["cost_nanos"])
        if (new_cost, new_ref) == (old_cost, m["price_ref"]):
            continue
        result.changed += 1
        if old_cost is None and new_cost is not None:
            result.newly_priced += 1
        elif old_cost is not None and new_cost is None:
            result.newly_unpriced += 1
        delta = (new_cost or 0) - (old_cost or 0)
        result.delta_nanos += delta
        change = result.changes.setdefault(
            (m["team"], m["requested_model"]), RerateChange(m["team"], m["requested_model"])
        )
        change.records += 1
        change.old_nanos += old_cost or 0
        change.new_nanos += new_cost or 0
        updates.append({"b_event_id": m["event_id"], "b_cost": new_cost, "b_ref": new_ref})
        has_tokens = has_usage(view.usage)
        unpriced_delta = int(has_tokens and new_cost is None) - int(has_tokens and old_cost is None)
        key = (
            hour_of(m["started_at"]),
            m["team"],
            m["key_fingerprint"] or "",
            m["requested_model"] or "",
            m["endpoint"],
            (NULL_KEY if m["key_fingerprint"] is None else 0)
            + (NULL_MODEL if m["requested_model"] is None else 0),
        )
        deltas[key][0] += delta
        deltas[key][1] += unpriced_delta
    return updates, deltas


def _hourly_params(deltas: dict[tuple[Any, ...], list[int]]) -> list[dict[str, Any]]:
    # Key order (meter.db.rollups, Rule 4): writers lock rollup rows in the same order, no deadlock.
    return [
        {
            "b_hour": hour,
            "b_team": team,
            "b_key": key,
            "b_model": model,
            "b_endpoint": endpoint,
            "b_null_dims": null_dims,
            "b_cost_delta": cost,
            "b_unpriced_delta": unpriced,
        }
        for (hour, team, key, model, endpoint, null_dims), (cost, unpriced) in sorted(deltas.items())
        if cost or unpriced
    ]
