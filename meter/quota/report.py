"""Quota status as operators see it: subject states in, JSON-friendly dicts and table rows out.

Shared by ``GET /admin/v1/quota/status`` (live, from the running process's admission) and
``meter quota status`` (Redis, or the database's rollups). Pure: no I/O.

Rule 1 (who): a subject is shown by what the caller passes in ``who`` (a team name; a key's id,
        suffix and team). A key's fingerprint is never shown: status output gets pasted into tickets.
Rule 2 (money is exact): USD amounts are decimal strings; the configured budget is shown as set.
Rule 3 (unknown is not zero): a source that cannot know a counter (the database knows neither rate
        windows nor requests in flight nor reservations) renders it as None (JSON null, ``-`` in
        tables), never 0. ``remaining`` is ``limit - used - reserved``; negative means the limit was
        overshot (responses that cost more than they reserved).
Rule 4 (resets): a budget resets at the end of its period; rpm/tpm when the 60-second window is
        empty again (None when it already is); concurrency when requests finish (None).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from meter.quota.decision import LimitKind
from meter.quota.policy import RANKED_LIMITS, Limits
from meter.quota.store import SubjectState

RATE_KINDS = frozenset({LimitKind.RPM, LimitKind.TPM})


def _usd(value: Decimal) -> str:
    return format(value, "f")


def _amount(kind: LimitKind, value: Decimal | int | None) -> str | int | None:
    if value is None:
        return None
    if kind is LimitKind.BUDGET_USD:
        return _usd(Decimal(value))
    return int(value)


def render_state(
    state: SubjectState | None,
    who: Mapping[str, Any],
    now: datetime,
    *,
    live: bool = True,
) -> dict[str, Any]:
    """One subject: ``who`` (Rule 1), its period and every limit with its use. ``state`` None: the
    subject has no limits. ``live`` False: rate windows, in-flight requests and reservations are
    unknown (Rule 3)."""
    if state is None:
        return {
            "subject": dict(who),
            "budget_period": None,
            "period_start": None,
            "period_end": None,
            "limits": [],
        }
    limits = state.limits
    rows = []
    for usage in state.usage():
        kind = usage.kind
        limit: Decimal | int = usage.limit
        if kind is LimitKind.BUDGET_USD and limits.budget_usd is not None:
            limit = limits.budget_usd  # as configured (usage.limit is floored to micro-USD)
        used: Decimal | int | None = usage.used
        reserved: Decimal | int | None = usage.reserved
        if not live:
            reserved = None
            if not kind.is_budget:
                used = None
        if used is None:
            remaining = ratio = None
        else:
            total = used + (reserved or 0)
            remaining = limit - total
            ratio = round(float(total / limit), 6) if limit else (1.0 if total else 0.0)
        rows.append(
            {
                "kind": kind.value,
                "limit": _amount(kind, limit),
                "used": _amount(kind, used),
                "reserved": _amount(kind, reserved),
                "remaining": _amount(kind, remaining),
                "ratio": ratio,
                "resets_at": _resets_at(state, kind, now, live),
            }
        )
    return {
        "subject": dict(who),
        "budget_period": limits.budget_period,
        "period_start": state.period_start.isoformat(),
        "period_end": state.period_end.isoformat(),
        "limits": rows,
    }


def _resets_at(state: SubjectState, kind: LimitKind, now: datetime, live: bool) -> str | None:
    if kind.is_budget:
        return state.period_end.isoformat()
    if kind in RATE_KINDS and live and state.window_reset_ms > 0:
        return (now + timedelta(milliseconds=state.window_reset_ms)).isoformat()
    return None


def render_status(
    subjects: Sequence[tuple[Mapping[str, Any], SubjectState | None]],
    now: datetime,
    *,
    source: str,
    live: bool = True,
) -> dict[str, Any]:
    """The whole answer: ``source`` says where the numbers come from, ``at`` when they were read."""
    return {
        "object": "quota_status",
        "source": source,
        "at": now.isoformat(),
        "data": [render_state(state, who, now, live=live) for who, state in subjects],
    }


def describe_subject(who: Mapping[str, Any]) -> str:
    """``team search`` or ``key 12 (...abcd, team search)``."""
    if who.get("kind") == "key":
        details = ", ".join(
            str(v) for v in (who.get("suffix"), who.get("team") and f"team {who['team']}") if v
        )
        return f"key {who.get('key_id')}" + (f" ({details})" if details else "")
    return f"team {who.get('team')}"


def status_rows(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:func:`render_status`'s answer flattened to one row per subject and limit (tables, CSV)."""
    rows: list[dict[str, Any]] = []
    for entry in status["data"]:
        subject = describe_subject(entry["subject"])
        if not entry["limits"]:
            rows.append({"subject": subject, "limit": "(no limits)"})
            continue
        for limit in entry["limits"]:
            rows.append(
                {
                    "subject": subject,
                    "limit": limit["kind"],
                    "period": entry["budget_period"] if LimitKind(limit["kind"]).is_budget else "",
                    "max": limit["limit"],
                    "used": limit["used"],
                    "reserved": limit["reserved"],
                    "remaining": limit["remaining"],
                    "used_pct": None if limit["ratio"] is None else f"{limit['ratio'] * 100:.1f}%",
                    "resets_at": limit["resets_at"],
                }
            )
    return rows


def limits_summary(limits: Limits | None) -> str | None:
    """A one-line summary for listings: ``budget_usd=25.00 rpm=600 period=month``; None without
    limits (``period`` only when a budget is set)."""
    if limits is None:
        return None
    data = limits.to_dict()
    parts = [f"{name}={data[name]}" for name in RANKED_LIMITS if data[name] is not None]
    if not parts:
        return "(none)"
    budgets = any(data[name] is not None for name in RANKED_LIMITS[:4])
    text = " ".join(parts)
    return f"{text} period={limits.budget_period}" if budgets else text
