"""Schema of tenancy and prices: teams, their keys, operator price rows, the audit log, and the
change marker every replica polls. Same ``Base`` metadata as :mod:`meter.db.models`; importing
:mod:`meter.db` registers these tables there (so Alembic and the schema test see them).

Invariants:

Rule 1: no secret is stored. A key is kept as its HMAC-SHA256 fingerprint under ``METER_KEY_SECRET``
        (the same one :mod:`meter.tenancy.identity` puts on usage records, so a key row and its usage join on
        ``fingerprint``) plus a display suffix. A team's upstream credential is a *name* that the
        running process resolves from its own configuration (:mod:`meter.tenancy.credentials`).
Rule 2: every write to ``teams``, ``api_keys`` or ``prices`` bumps ``tenancy_state.version`` in the
        same transaction and adds one ``audit_log`` row; replicas reload their caches when the version
        they last saw changes (:mod:`meter.tenancy.directory`).
Rule 3: money is an integer: price columns hold nano-USD per 1,000,000 tokens (``"0.20"`` USD per
        1M is ``200000000``), exact on SQLite and PostgreSQL alike. A NULL cached price means "same as
        input".
Rule 4: price rows are never updated or deleted: a correction is a new row (same model and
        ``effective_from``; the higher id wins), so ``price_ref = "db:<id>"`` on a usage record
        always names the row that priced it.
Rule 5: ``limits`` of a team or key is its quota policy as ``meter.quota.policy.Limits.to_dict()``
        (money as decimal strings); SQL NULL means no limits (written as ``sqlalchemy.null()``, since
        a Python None would be stored as JSON ``null``; readers treat both alike).

migrations/versions/0003_tenancy_prices_costs.py creates these tables (0004_quota_limits.py adds
``limits``); tests/db/test_migrations.py checks they agree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, SmallInteger, String, Table, Text
from sqlalchemy.orm import Mapped, mapped_column

from meter.db.models import Base, PortableJSON
from meter.db.types import UtcDateTime

# SQLite assigns rowids only to an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
AutoId = BigInteger().with_variant(Integer(), "sqlite")


class TeamRow(Base):
    __tablename__ = "teams"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    description: Mapped[str] = mapped_column(Text, nullable=False)
    labels: Mapped[dict[str, Any]] = mapped_column(PortableJSON, nullable=False)
    # The name of an upstream credential (Rule 1) virtual keys of this team are forwarded with.
    upstream_credential: Mapped[str | None] = mapped_column(Text)
    limits: Mapped[dict[str, Any] | None] = mapped_column(PortableJSON)  # Rule 5
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    team_id: Mapped[int] = mapped_column(AutoId, ForeignKey("teams.id"), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "virtual" | "passthrough"
    fingerprint: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    suffix: Mapped[str] = mapped_column(Text, nullable=False)  # "...abcd", or "" if registered by fingerprint
    name: Mapped[str] = mapped_column(Text, nullable=False)  # the operator's label for the key
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime())  # coarse: flushed every few s
    limits: Mapped[dict[str, Any] | None] = mapped_column(PortableJSON)  # Rule 5

    __table_args__ = (Index("ix_api_keys_team_id", "team_id"),)


class PriceDbRow(Base):
    __tablename__ = "prices"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(Text, nullable=False)  # a model name, or "tier:<name>"
    input_nanos: Mapped[int] = mapped_column(BigInteger, nullable=False)  # nano-USD per 1M tokens
    cached_input_nanos: Mapped[int | None] = mapped_column(BigInteger)
    output_nanos: Mapped[int] = mapped_column(BigInteger, nullable=False)
    effective_from: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)

    __table_args__ = (Index("ix_prices_model_effective_from", "model", "effective_from"),)


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    actor: Mapped[str] = mapped_column(Text, nullable=False)  # "admin:<token digest prefix>" or "cli:<user>"
    action: Mapped[str] = mapped_column(Text, nullable=False)  # e.g. "team.create", "key.revoke"
    target: Mapped[str] = mapped_column(Text, nullable=False)  # e.g. "team:search", "key:12"
    detail: Mapped[dict[str, Any]] = mapped_column(PortableJSON, nullable=False)

    __table_args__ = (Index("ix_audit_log_at", "at"),)


class TenancyStateRow(Base):
    """One row (id 1): the change marker of Rule 2."""

    __tablename__ = "tenancy_state"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger, nullable=False)


teams: Table = Base.metadata.tables["teams"]
api_keys: Table = Base.metadata.tables["api_keys"]
prices: Table = Base.metadata.tables["prices"]
audit_log: Table = Base.metadata.tables["audit_log"]
tenancy_state: Table = Base.metadata.tables["tenancy_state"]
