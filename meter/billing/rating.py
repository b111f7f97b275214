"""Billing arithmetic: which price row a record uses, what it costs, and how report lines add up.

Rule 1 (one rounding): a record's cost is :func:`meter.billing.prices.compute_cost` of its usage at one
        price row, rounded once, half-even, to whole nano-USD, and stored as the integer
        ``cost_nanos``. Every total is the integer sum of stored ``cost_nanos``, shown as a Decimal
        with 9 places: a report's total equals the sum of its lines, which equals the sum of its
        records. Nothing is re-rounded on the way.
Rule 2 (the row is recorded): a priced record also stores ``price_ref``, the row it used:
        ``db:<id>`` (a row added with the admin API / CLI), ``file:<effective_from>:<model>`` (the
        price file, ``METER_PRICE_FILE``) or ``sheet:<effective_from date>:<model>`` (the shipped sheet).
Rule 3 (unpriced is not free): a record with token usage but no applicable row has ``cost_nanos``
        and ``price_ref`` NULL and is *unpriced*; reports count those next to the cost, and
        ``meter_unpriced_requests_total`` counts them as they happen. A record without token usage
        (e.g. a refused request) has no cost and is not unpriced.
Rule 4 (which model): the model that answered (``response_model``) is priced first, then the
        requested one; a model's own row wins over a size-tier fallback of either name.
Rule 5 (precedence): rows for the same model are merged from the shipped sheet, the price file
        and the database, in that order; at each moment the row with the latest ``effective_from``
        not after the request's ``started_at`` applies, and on equal ``effective_from`` the later
        source (then the higher database id) wins. An operator row for a short name (``llama-x``)
        also covers ``accounts/fireworks/models/llama-x``.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from meter.billing.prices import PriceCatalog, PriceRow, compute_cost, from_nanos, to_nanos
from meter.records import Usage

FIREWORKS_PREFIX = "accounts/fireworks/models/"
_MEMO_LIMIT = 10_000
TIER_PREFIX = "tier:"


class Priced(Protocol):
    """What :func:`price_record` reads from a record (a UsageRecord or a stored row)."""

    @property
    def started_at(self) -> datetime: ...
    @property
    def requested_model(self) -> str | None: ...
    @property
    def response_model(self) -> str | None: ...
    @property
    def usage(self) -> Usage: ...


@dataclass(frozen=True, slots=True)
class UsageView:
    """What pricing reads, for callers that hold no UsageRecord (a stored row, the proxy's state)."""

    started_at: datetime
    requested_model: str | None
    response_model: str | None
    usage: Usage


class PricedCatalog:
    """A :class:`PriceCatalog` over the merged rows of Rule 5, which also knows each row's ``price_ref``."""

    def __init__(
        self,
        sheet: Iterable[PriceRow] = (),
        file: Iterable[PriceRow] = (),
        db: Iterable[PriceRow] = (),
    ) -> None:
        refs: dict[PriceRow, str] = {}
        rows: list[PriceRow] = []
        for origin, group in (("sheet", sheet), ("file", file), ("db", db)):
            ordered = sorted(group, key=lambda r: r.id or 0) if origin == "db" else list(group)
            for row in ordered:
                ref = _ref(origin, row)
                for variant in _aliases(row, origin):
                    refs.setdefault(variant, ref)
                    rows.append(variant)
        self.catalog = PriceCatalog(rows)  # stable sort by effective_from keeps Rule 5's tie order
        self._refs = refs
        self.sources = {"sheet": [*sheet], "file": [*file], "db": [*db]}
        self._memo: dict[tuple[str, datetime], PriceRow | None] = {}
        self._hour = self._hour_end = datetime.min.replace(tzinfo=UTC)  # the hour last looked up

    def lookup(self, model: str | None, at: datetime) -> PriceRow | None:
        """:meth:`PriceCatalog.lookup`, memoised per model and UTC hour when no row of the model's
        chain starts inside that hour (the common case: one answer per model for the whole hour)."""
        if not model:
            return None
        if self._hour <= at < self._hour_end:  # two comparisons instead of truncating ``at`` each time
            hour = self._hour
        else:
            hour = at.replace(minute=0, second=0, microsecond=0)
            self._hour, self._hour_end = hour, hour + timedelta(hours=1)
        key = (model, hour)
        if key in self._memo:
            return self._memo[key]
        row = self.catalog.lookup(model, at)
        # Rows only ever start: the same answer at both ends of the hour means the same all through it.
        last = hour + timedelta(hours=1) - timedelta(microseconds=1)
        if self.catalog.lookup(model, hour) is row and self.catalog.lookup(model, last) is row:
            if len(self._memo) >= _MEMO_LIMIT:  # model names come from clients: bound the memory
                self._memo.clear()
            self._memo[key] = row
        return row

    def ref(self, row: PriceRow) -> str:
        return self._refs.get(row) or _ref("db" if row.id is not None else "sheet", row)

    def with_db_rows(self, db: Iterable[PriceRow]) -> PricedCatalog:
        return PricedCatalog(self.sources["sheet"], self.sources["file"], db)


def _ref(origin: str, row: PriceRow) -> str:
    if origin == "db" and row.id is not None:
        return f"db:{row.id}"
    if origin == "file":
        return f"file:{row.effective_from.astimezone(UTC).isoformat()}:{row.model}"
    return f"sheet:{row.effective_from.astimezone(UTC).date().isoformat()}:{row.model}"


def _aliases(row: PriceRow, origin: str) -> list[PriceRow]:
    if origin != "sheet" and "/" not in row.model and not row.model.startswith(TIER_PREFIX):
        return [row, dataclasses.replace(row, model=FIREWORKS_PREFIX + row.model)]
    return [row]


def pick_row(catalog: PricedCatalog, record: Priced) -> PriceRow | None:
    """The row that prices ``record`` (Rule 4), or None."""
    fallback: PriceRow | None = None
    seen: set[str] = set()
    for model in (record.response_model, record.requested_model):
        if not model or model in seen:
            continue
        seen.add(model)
        row = catalog.lookup(model, record.started_at)
        if row is None:
            continue
        if not row.model.startswith(TIER_PREFIX):
            return row
        fallback = fallback or row
    return fallback


def has_usage(usage: Usage) -> bool:
    return (
        usage.prompt_tokens is not None
        or usage.completion_tokens is not None
        or usage.total_tokens is not None
    )


def price_record(record: Priced, catalog: PricedCatalog) -> tuple[int | None, str | None]:
    """``(cost_nanos, price_ref)`` of ``record`` (Rules 1-4); ``(None, None)`` when unpriced or
    when there is nothing to price (tell the two apart with :func:`is_unpriced`)."""
    usage = record.usage
    if usage.prompt_tokens is None and usage.completion_tokens is None:
        return None, None  # nothing itemised to price (a total alone cannot be split in/out)
    row = pick_row(catalog, record)
    if row is None:
        return None, None
    cost = compute_cost(usage, row.price)
    if cost is None:  # pragma: no cover - compute_cost only says None for no usage, excluded above
        return None, None
    return to_nanos(cost), catalog.ref(row)


def is_unpriced(usage: Usage, cost_nanos: int | None) -> bool:
    """Rule 3: tokens were used and nothing priced them."""
    return cost_nanos is None and has_usage(usage)


class Usd(Decimal):
    """An amount of USD that prints in fixed point with its 9 places (``0.000000000``, never ``0E-9``),
    in tables, CSV and JSON alike. Arithmetic on it gives plain Decimals."""

    __slots__ = ()

    def __str__(self) -> str:
        return format(self, "f")


def usd(nanos: int) -> Usd:
    """Stored nano-USD as exact USD with 9 places."""
    return Usd(from_nanos(int(nanos)))


# -- report periods -------------------------------------------------------------------------------


def month_range(month: str) -> tuple[datetime, datetime]:
    """``"2026-11"`` → [2026-11-01, 2026-12-01) in UTC; ValueError for anything else."""
    try:
        year_text, month_text = month.split("-")
        year, number = int(year_text), int(month_text)
        start = datetime(year, number, 1, tzinfo=UTC)
    except ValueError:
        raise ValueError(f"month must look like 2026-11, got {month!r}") from None
    end = datetime(year + (number == 12), number % 12 + 1, 1, tzinfo=UTC)
    return start, end


PERIODS: tuple[str, ...] = ("day", "month")


def period_of(day: str, period: str) -> str:
    """The report period of a UTC day ``'YYYY-MM-DD'``: the day itself, or ``'YYYY-MM'``."""
    if period == "day":
        return day
    if period == "month":
        return day[:7]
    raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")


# -- report lines ---------------------------------------------------------------------------------

TOKEN_FIELDS: tuple[str, ...] = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")


@dataclass(frozen=True, slots=True)
class BillingLine:
    """One team by model by period of a report. Token sums are None when no record reported them."""

    period: str
    team: str
    model: str | None
    requests: int
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    cost_nanos: int  # sum over the priced records
    unpriced_requests: int

    @property
    def cost_usd(self) -> Usd:
        return usd(self.cost_nanos)

    def to_row(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "team": self.team,
            "model": self.model,
            "requests": self.requests,
            **{name: getattr(self, name) for name in TOKEN_FIELDS},
            "cost_usd": self.cost_usd,
            "unpriced_requests": self.unpriced_requests,
        }


def merge_lines(lines: Iterable[BillingLine], period: str) -> list[BillingLine]:
    """Lines (per day) merged into ``period`` ("day" or "month"), ordered by period, team, model."""
    merged: dict[tuple[str, str, str | None], BillingLine] = {}
    for line in lines:
        key = (period_of(line.period, period), line.team, line.model)
        current = merged.get(key)
        merged[key] = dataclasses.replace(line, period=key[0]) if current is None else _add(current, line)
    return [merged[key] for key in sorted(merged, key=lambda k: (k[0], k[1], k[2] is None, k[2] or ""))]


def _add(a: BillingLine, b: BillingLine) -> BillingLine:
    def plus(x: int | None, y: int | None) -> int | None:
        return None if x is None and y is None else (x or 0) + (y or 0)

    return dataclasses.replace(
        a,
        requests=a.requests + b.requests,
        prompt_tokens=plus(a.prompt_tokens, b.prompt_tokens),
        completion_tokens=plus(a.completion_tokens, b.completion_tokens),
        cached_tokens=plus(a.cached_tokens, b.cached_tokens),
        reasoning_tokens=plus(a.reasoning_tokens, b.reasoning_tokens),
        cost_nanos=a.cost_nanos + b.cost_nanos,
        unpriced_requests=a.unpriced_requests + b.unpriced_requests,
    )


@dataclass(frozen=True, slots=True)
class BillingReport:
    since: datetime | None
    until: datetime | None
    period: str
    lines: Sequence[BillingLine]

    @property
    def total_nanos(self) -> int:
        return sum(line.cost_nanos for line in self.lines)

    @property
    def total_usd(self) -> Usd:
        return usd(self.total_nanos)

    @property
    def unpriced_requests(self) -> int:
        return sum(line.unpriced_requests for line in self.lines)

    def team_totals(self) -> dict[str, Usd]:
        totals: dict[str, int] = {}
        for line in self.lines:
            totals[line.team] = totals.get(line.team, 0) + line.cost_nanos
        return {team: usd(nanos) for team, nanos in sorted(totals.items())}

    def to_json(self) -> dict[str, Any]:
        def text(value: Any) -> Any:
            return str(value) if isinstance(value, Decimal) else value

        return {
            "object": "billing_report",
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
            "period": self.period,
            "currency": "USD",
            "rounding": "each request rounded once, half-even, to 1e-9 USD; totals are exact sums",
            "data": [{k: text(v) for k, v in line.to_row().items()} for line in self.lines],
            "teams": {team: str(total) for team, total in self.team_totals().items()},
            "total_usd": str(self.total_usd),
            "unpriced_requests": self.unpriced_requests,
        }
