"""Quota limits of teams and keys as the tenancy tables store them, and their validation.

Rule 1: quota limits are stored whole (``Limits.to_dict()``; NULL when none): setting them replaces the
        previous set, and the audit detail is the new set (``{}`` when cleared). Setting the same
        limits again changes, audits and bumps nothing.
Rule 2: a stored value this version cannot read is shown as none, never an error, so the team or key
        stays manageable.
Rule 3: every limit (the USD budget in micro-USD) must be at most :data:`MAX_LIMIT` (2**53 - 1), the
        largest integer the Redis scripts count exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from meter.errors import RequestError
from meter.quota.policy import RANKED_LIMITS, Limits

log = logging.getLogger("meter.tenancy")


def limits_json(limits: Limits | None) -> dict[str, Any] | None:
    """How limits are stored and shown: ``Limits.to_dict()`` (money as strings), None for none."""
    return None if limits is None else limits.to_dict()


def stored_limits(value: Any, subject: str = "") -> Limits | None:
    """The limits a ``limits`` column holds (SQL NULL and JSON null alike mean none). A value this
    version cannot read (e.g. written by a newer meter) is logged and shown as None, so the team or
    key stays manageable; the directory keeps enforcing what it last read (meter.tenancy.directory)."""
    if value is None:
        return None
    try:
        return Limits.from_dict(value)
    except (ValueError, TypeError) as exc:
        log.warning("cannot read the stored quota limits of %s (%s); shown as none", subject, exc)
        return None


def parse_limits(data: Any) -> Limits:
    """``data`` (a mapping of Limits fields, e.g. an admin API body) as validated :class:`Limits`;
    RequestError (400) with Limits.from_dict's message naming the offending field otherwise."""
    if isinstance(data, Limits):
        return data
    if not isinstance(data, Mapping):
        raise RequestError("limits must be an object of limit fields", param="limits")
    try:
        limits = Limits.from_dict(data)
    except ValueError as exc:
        message = str(exc)
        unknown = sorted(str(name) for name in data if name not in _LIMIT_FIELDS)
        param = (
            unknown[0]
            if unknown
            else next((name for name in _LIMIT_FIELDS if message.startswith(name + " ")), "limits")
        )
        raise RequestError(message, param=param) from None
    for name, value in zip(RANKED_LIMITS, limits.by_rank, strict=True):
        if value is not None and value > MAX_LIMIT:
            largest = Decimal(MAX_LIMIT) / 1_000_000 if name == "budget_usd" else MAX_LIMIT
            raise RequestError(f"{name} must be at most {largest}", param=name)
    return limits


_LIMIT_FIELDS = tuple(Limits().to_dict())
# Redis scripts count in Lua numbers (doubles), exact up to 2**53: larger limits would not be enforced
# exactly.
MAX_LIMIT = 2**53 - 1
