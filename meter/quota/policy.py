"""Quota policies: the :class:`Limits` set on one :class:`Subject` (a team, or a key fingerprint).

A request is checked against its team's policy and its key's policy, and must pass all of them
(:mod:`meter.quota.decision`). What it is checked with: :mod:`meter.quota.spend` (estimates and actual
spend), :mod:`meter.quota.periods` (budget periods and the store clock).

Rule 1 (validated once): a :class:`Limits` is checked when it is built (the admin API, config files:
        :meth:`Limits.from_dict` names the offending field), so admission never meets a malformed one.
Rule 2 (budgets round down): ``budget_usd`` is held as integer micro-USD rounded *down*
        (:attr:`Limits.budget_micros`; :mod:`meter.quota.spend`, Rule 1, states all the rounding).

This module is pure: it imports nothing from redis, litestar, httpx or SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any, Literal

from meter.quota.periods import PERIODS, Period
from meter.quota.spend import MICROS


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one subject. ``None`` means "no limit of this kind"; ``0`` refuses everything.

    ``budget_period`` applies to all budgets (USD and tokens). ``soft_ratio`` is the share of a budget
    at which meter raises a metric and a log line (once per period and limit).
    """

    budget_usd: Decimal | None = None
    budget_period: Period = "month"
    tokens_budget: int | None = None
    prompt_tokens_budget: int | None = None
    completion_tokens_budget: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    soft_ratio: Decimal = Decimal("0.8")
    # Derived once (admission reads them on every request): the limit per LimitKind rank (micro-USD
    # for the USD budget) and the soft threshold per budget kind (None: no limit, or a zero one).
    by_rank: tuple[int | None, ...] = field(init=False, repr=False, compare=False)
    soft_by_rank: tuple[int | None, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.budget_period not in PERIODS:
            raise ValueError(f"budget_period must be one of {', '.join(PERIODS)}, not {self.budget_period!r}")
        if self.budget_usd is not None:
            if not isinstance(self.budget_usd, Decimal) or not self.budget_usd.is_finite():
                raise ValueError("budget_usd must be a finite Decimal")
            if self.budget_usd < 0:
                raise ValueError("budget_usd must not be negative")
        for name in _INT_LIMITS:
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None")
        if not isinstance(self.soft_ratio, Decimal) or not Decimal(0) < self.soft_ratio <= Decimal(1):
            raise ValueError("soft_ratio must be a Decimal in (0, 1]")
        budget = (
            None
            if self.budget_usd is None
            else int((self.budget_usd * MICROS).to_integral_value(ROUND_FLOOR))
        )
        by_rank = (budget, *(getattr(self, name) for name in _INT_LIMITS))
        soft = tuple(soft_threshold(v, self.soft_ratio) if v else None for v in by_rank[:4])
        object.__setattr__(self, "by_rank", by_rank)
        object.__setattr__(self, "soft_by_rank", soft)

    @property
    def budget_micros(self) -> int | None:
        return self.by_rank[0]

    @property
    def has_rates(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    @property
    def is_empty(self) -> bool:
        return self.budget_usd is None and all(getattr(self, name) is None for name in _INT_LIMITS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (money as a string, so it stays exact)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        out["budget_usd"] = None if self.budget_usd is None else str(self.budget_usd)
        out["soft_ratio"] = str(self.soft_ratio)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        """Parse and validate (admin API, config files); the ValueError names the offending field."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown quota limit(s): {', '.join(unknown)}")
        values = dict(data)
        for name in ("budget_usd", "soft_ratio"):
            raw = values.get(name)
            if raw is not None and not isinstance(raw, Decimal):
                if isinstance(raw, bool) or not isinstance(raw, str | int | float):
                    raise ValueError(f"{name} must be a decimal number")
                try:
                    values[name] = Decimal(str(raw))
                except InvalidOperation:
                    raise ValueError(f"{name} must be a decimal number, not {raw!r}") from None
            elif name == "soft_ratio" and raw is None:
                values.pop(name, None)
        return cls(**values)


_INT_LIMITS = (
    "tokens_budget",
    "prompt_tokens_budget",
    "completion_tokens_budget",
    "rpm",
    "tpm",
    "max_concurrent",
)
# Every limit field in ``Limits.by_rank`` order (a LimitKind's rank; the USD budget in micro-USD there).
RANKED_LIMITS = ("budget_usd", *_INT_LIMITS)


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a policy is set on: ``Subject("team", "acme")`` or ``Subject("key", <fingerprint>)``."""

    kind: Literal["team", "key"]
    name: str

    @property
    def id(self) -> str:
        """Stable identifier used in store keys."""
        return f"{self.kind}:{self.name}"

    def describe(self) -> str:
        """For messages shown to clients: never the fingerprint."""
        return f"team '{self.name}'" if self.kind == "team" else "this API key"


@dataclass(frozen=True, slots=True)
class Policy:
    subject: Subject
    limits: Limits


def soft_threshold(limit: int, ratio: Decimal) -> int:
    return int((limit * ratio).to_integral_value(ROUND_CEILING))
