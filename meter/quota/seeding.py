"""What a subject spent in a budget period, read back from the database's ``usage_hourly`` rollups.

A quota store keeps its counters in memory or Redis; after a restart (or a Redis that lost its data)
they are rebuilt from what the database recorded (:meth:`meter.quota.admission.Admission.seed`).
``meter quota status`` without Redis reads the same sums.

Rule 1 (hours): the rollups hold whole UTC hours, so a period is read as every rollup hour that
        overlaps ``[start, end)``: ``start`` is rounded down to its hour. A period whose bounds are
        not on an hour (time zones with :30 or :45 offsets, e.g. Asia/Kolkata) therefore includes the
        whole hour across each bound: the sum errs on the high side, as admission's estimates do.
Rule 2 (tokens): a rollup sums only the counts its records reported (NULL is "not reported", never
        zero). ``total_tokens`` of a rollup row is taken as at least its prompt + completion tokens,
        so records that reported the parts but not the total still count.
Rule 3 (money): costs are summed as integer nano-USD and converted exactly to ``Decimal`` USD.
        Unpriced records add tokens but no cost (admission reserves $0 for unpriced models too).

What the rollups cannot know: records still in a replica's journal (not yet written) are missing
until the writer catches up; the store's own counters, when present, win (seeding never overwrites).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from meter.db.models import usage_hourly
from meter.quota.policy import Subject
from meter.quota.spend import Spend

NANOS = Decimal(1_000_000_000)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("period bounds must be timezone-aware")
    return moment.astimezone(UTC)


def hour_floor(moment: datetime) -> datetime:
    """The start of ``moment``'s UTC hour (aware, UTC)."""
    return _utc(moment).replace(minute=0, second=0, microsecond=0)


async def period_spend(conn: AsyncConnection, subject: Subject, start: datetime, end: datetime) -> Spend:
    """The prompt, completion and total tokens and the cost ``subject`` used in ``[start, end)``, summed
    from ``usage_hourly`` (team subjects by ``team``, key subjects by ``key_fingerprint``). ``start`` is
    rounded down to the hour (Rule 1): a period starting at 18:30 UTC, e.g. midnight in Asia/Kolkata,
    also counts 18:00-18:30. Bounds must be timezone-aware."""
    h = usage_hourly.c
    column = h.team if subject.kind == "team" else h.key_fingerprint
    parts = h.prompt_tokens + h.completion_tokens
    total = case((h.total_tokens < parts, parts), else_=h.total_tokens)  # Rule 2
    stmt = select(
        func.coalesce(func.sum(h.prompt_tokens), 0),
        func.coalesce(func.sum(h.completion_tokens), 0),
        func.coalesce(func.sum(total), 0),
        func.coalesce(func.sum(h.cost_nanos), 0),
    ).where(column == subject.name, h.hour >= hour_floor(start), h.hour < _utc(end))
    prompt, completion, total_tokens, cost_nanos = (await conn.execute(stmt)).one()
    return Spend(int(prompt), int(completion), int(total_tokens), Decimal(int(cost_nanos)) / NANOS)
