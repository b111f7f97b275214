"""The database schema: one ``usage_events`` row per :class:`~meter.records.UsageRecord`.

Invariants:

Rule 1: every ``UsageRecord`` field has a column of the same name; :func:`record_to_row` and
        :func:`row_to_record` are exact inverses for every value the database can hold (see Rule 4
        for the two values it cannot).
Rule 2: ``event_id`` is the primary key, so writing the same record twice stores it once.
Rule 3: token counts are nullable ``BIGINT``: NULL means "not reported", never zero.
Rule 4: values a backend would refuse are made storable rather than letting one record block a
        batch: NUL characters in text (PostgreSQL rejects them) become U+FFFD, and non-finite
        numbers in ``upstream_metrics`` (JSON has no NaN/Infinity) become null.
Rule 5: the schema is portable: no native enums (outcome and usage_source are text, so adding a
        value needs no migration), JSONB only as a PostgreSQL variant of portable JSON, and
        :class:`~meter.db.types.UtcDateTime` for timestamps.

This module describes the schema; migrations/versions/ creates it. A test checks they agree.
"""

from __future__ import annotations

import math
from dataclasses import fields
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Double, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from meter.db.types import UtcDateTime
from meter.records import Outcome, UsageRecord, UsageSource

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

PortableJSON = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UsageEvent(Base):
    __tablename__ = "usage_events"

    event_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    method: Mapped[str] = mapped_column(Text, nullable=False)
    endpoint: Mapped[str] = mapped_column(Text, nullable=False)
    status_code: Mapped[int] = mapped_column(Integer, nullable=False)
    outcome: Mapped[str] = mapped_column(String(32), nullable=False)
    usage_source: Mapped[str] = mapped_column(String(32), nullable=False)
    stream: Mapped[bool] = mapped_column(Boolean, nullable=False)
    key_fingerprint: Mapped[str | None] = mapped_column(Text)
    key_suffix: Mapped[str | None] = mapped_column(Text)
    team: Mapped[str] = mapped_column(Text, nullable=False)
    requested_model: Mapped[str | None] = mapped_column(Text)
    response_model: Mapped[str | None] = mapped_column(Text)
    response_id: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(BigInteger)
    completion_tokens: Mapped[int | None] = mapped_column(BigInteger)
    cached_tokens: Mapped[int | None] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int | None] = mapped_column(BigInteger)
    total_tokens: Mapped[int | None] = mapped_column(BigInteger)
    duration_ms: Mapped[float | None] = mapped_column(Double)
    upstream_headers_ms: Mapped[float | None] = mapped_column(Double)
    ttft_ms: Mapped[float | None] = mapped_column(Double)
    output_tokens_per_second: Mapped[float | None] = mapped_column(Double)
    overhead_ms: Mapped[float | None] = mapped_column(Double)
    server_ttft_ms: Mapped[float | None] = mapped_column(Double)
    server_processing_ms: Mapped[float | None] = mapped_column(Double)
    upstream_metrics: Mapped[dict[str, Any]] = mapped_column(PortableJSON, nullable=False)
    request_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    response_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    error: Mapped[str | None] = mapped_column(Text)

    # One index per report access path: a time range, optionally narrowed to one team/key/model.
    __table_args__ = (
        Index("ix_usage_events_started_at", "started_at"),
        Index("ix_usage_events_team_started_at", "team", "started_at"),
        Index("ix_usage_events_key_fingerprint_started_at", "key_fingerprint", "started_at"),
        Index("ix_usage_events_requested_model_started_at", "requested_model", "started_at"),
    )


usage_events: Table = Base.metadata.tables[UsageEvent.__tablename__]
RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(UsageRecord))


def record_to_row(record: UsageRecord) -> dict[str, Any]:
    """The column values for ``record`` (Rule 1), made storable on every backend (Rule 4)."""
    row = {name: getattr(record, name) for name in RECORD_FIELDS}
    for name, value in row.items():
        if isinstance(value, str) and "\x00" in value:
            row[name] = value.replace("\x00", "\ufffd")
    # StrEnum values are str already; store the plain value so no driver sees an enum type.
    row["outcome"] = str(record.outcome.value if isinstance(record.outcome, Outcome) else record.outcome)
    row["usage_source"] = str(
        record.usage_source.value if isinstance(record.usage_source, UsageSource) else record.usage_source
    )
    row["upstream_metrics"] = {
        str(k): (v if not isinstance(v, float) or math.isfinite(v) else None)
        for k, v in (record.upstream_metrics or {}).items()
    }
    return row


def row_to_record(row: Any) -> UsageRecord:
    """The :class:`UsageRecord` stored in ``row`` (a result row or mapping with every column)."""
    mapping = row._mapping if hasattr(row, "_mapping") else row
    values = {name: mapping[name] for name in RECORD_FIELDS}
    values["outcome"] = Outcome(values["outcome"])
    values["usage_source"] = UsageSource(values["usage_source"])
    values["upstream_metrics"] = dict(values["upstream_metrics"] or {})
    return UsageRecord(**values)
