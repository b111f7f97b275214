"""The database schema: one ``usage_events`` row per :class:`~meter.records.UsageRecord`, and the
``usage_hourly`` rollup that reports read instead of the raw rows.

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

Rule 6: ``usage_hourly`` has one row per (UTC hour, team, key, requested model, endpoint) with the
        sums :mod:`meter.db.rollups` maintains. Its key columns are NOT NULL so that the primary key
        merges rows (SQL unique constraints treat NULLs as distinct): a NULL key fingerprint or
        requested model is stored as ``''`` with a bit set in ``null_dims`` (1: key, 2: model), so
        a real empty model name stays distinct from "none". Each token sum has a companion
        ``<name>_records`` count of the records that reported it: a sum over records that reported
        nothing is "not reported", never 0.

Rule 7: money is whole nano-USD (meter.billing.rating): ``usage_events.cost_nanos`` is a record's cost, NULL
        when unpriced or without usage, with ``price_ref`` naming the price row; ``usage_hourly`` sums
        the costs (0 when nothing was priced) and counts ``unpriced_requests``: records with token
        usage and no cost, which a report shows rather than billing them as $0.

This module describes the schema; migrations/versions/ creates it. A test checks they agree.
"""

from __future__ import annotations

import math
from dataclasses import fields
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)
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
    cost_nanos: Mapped[int | None] = mapped_column(BigInteger)  # Rule 7
    price_ref: Mapped[str | None] = mapped_column(Text)

    # One index per report access path: a time range, optionally narrowed to one team/key/model.
    __table_args__ = (
        Index("ix_usage_events_started_at", "started_at"),
        Index("ix_usage_events_team_started_at", "team", "started_at"),
        Index("ix_usage_events_key_fingerprint_started_at", "key_fingerprint", "started_at"),
        Index("ix_usage_events_requested_model_started_at", "requested_model", "started_at"),
    )


class UsageHourly(Base):
    """Hourly sums of ``usage_events`` (Rule 6), maintained in the transaction that inserts the rows."""

    __tablename__ = "usage_hourly"

    hour: Mapped[datetime] = mapped_column(UtcDateTime(), primary_key=True)  # start of the UTC hour
    team: Mapped[str] = mapped_column(Text, primary_key=True)
    key_fingerprint: Mapped[str] = mapped_column(Text, primary_key=True)  # '' if none (null_dims & 1)
    requested_model: Mapped[str] = mapped_column(Text, primary_key=True)  # '' if none (null_dims & 2)
    endpoint: Mapped[str] = mapped_column(Text, primary_key=True)
    null_dims: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    key_suffix: Mapped[str | None] = mapped_column(Text)  # the greatest seen, as reports show it
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    errors: Mapped[int] = mapped_column(BigInteger, nullable=False)  # outcome != 'ok'
    records_missing_usage: Mapped[int] = mapped_column(BigInteger, nullable=False)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    prompt_tokens_records: Mapped[int] = mapped_column(BigInteger, nullable=False)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    completion_tokens_records: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cached_tokens_records: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reasoning_tokens_records: Mapped[int] = mapped_column(BigInteger, nullable=False)
    total_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    total_tokens_records: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cost_nanos: Mapped[int] = mapped_column(BigInteger, nullable=False)  # sum over priced records
    unpriced_requests: Mapped[int] = mapped_column(BigInteger, nullable=False)  # Rule 7

    # The primary key leads with hour (time ranges); budgets and team reports narrow by these.
    __table_args__ = (
        Index("ix_usage_hourly_team_hour", "team", "hour"),
        Index("ix_usage_hourly_key_fingerprint_hour", "key_fingerprint", "hour"),
    )


usage_events: Table = Base.metadata.tables[UsageEvent.__tablename__]
usage_hourly: Table = Base.metadata.tables[UsageHourly.__tablename__]
RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(UsageRecord))


def record_to_row(record: UsageRecord) -> dict[str, Any]:
    """The column values for ``record`` (Rule 1), made storable on every backend (Rule 4)."""
    return make_storable({name: getattr(record, name) for name in RECORD_FIELDS})


def make_storable(row: dict[str, Any]) -> dict[str, Any]:
    """Rule 4, in place on a mapping of every record field (a record's, or a decoded journal
    payload's); returns ``row``. meter.journal.payload.storable_payload does the same for JSON."""
    for name, value in row.items():
        if isinstance(value, str) and "\x00" in value:
            row[name] = value.replace("\x00", "\ufffd")
    # StrEnum values are str already; store the plain value so no driver sees an enum type.
    for name in ("outcome", "usage_source"):
        value = row[name]
        row[name] = str(value.value if isinstance(value, Outcome | UsageSource) else value)
    row["upstream_metrics"] = {
        str(k): (v if not isinstance(v, float) or math.isfinite(v) else None)
        for k, v in (row["upstream_metrics"] or {}).items()
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
