"""Time in quota: calendar-aligned budget periods and the millisecond clock the stores count in.

Rule 1 (periods are calendar-aligned): a budget period is the local day, ISO week (Monday 00:00) or
        month containing ``now`` in the configured time zone (:func:`period_window`). A request is
        charged to the period it was admitted in, even when it settles after the period ended.
Rule 2 (exact time): the stores count instants as integer milliseconds since the Unix epoch
        (:func:`to_ms`, :func:`from_ms`), never float seconds.

This module is pure: it imports nothing from redis, litestar, httpx or SQLAlchemy.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as dtime
from typing import Literal

Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def period_window(period: Period, now: datetime, tz: tzinfo = UTC) -> tuple[datetime, datetime]:
    """The calendar period containing ``now`` in ``tz``: ``[start, end)`` as aware datetimes in ``tz``.

    Days follow local midnights (23 or 25 hours across DST changes); weeks start on ISO Monday; months
    on the 1st. A midnight that does not exist locally (DST at 00:00) resolves to the transition instant.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    today = now.astimezone(tz).date()
    if period == "day":
        start, end = today, today + timedelta(days=1)
    elif period == "week":
        start = today - timedelta(days=today.weekday())
        end = start + timedelta(days=7)
    elif period == "month":
        start = today.replace(day=1)
        end = date(start.year + (start.month == 12), start.month % 12 + 1, 1)
    else:
        raise ValueError(f"unknown period {period!r}")
    return datetime.combine(start, dtime(), tzinfo=tz), datetime.combine(end, dtime(), tzinfo=tz)


def to_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch (exact; no float)."""
    return (moment - EPOCH) // _MS


def to_epoch_seconds(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(seconds=1)


def from_ms(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)
