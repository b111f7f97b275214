"""Quota limits on teams and keys.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

``teams.limits`` and ``api_keys.limits``: the subject's quota limits as ``Limits.to_dict()`` (money as
decimal strings, so it stays exact), NULL when none are set (meter.db.tenancy_models, Rule 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TABLES = ("teams", "api_keys")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("limits", JSON, nullable=True))


def downgrade() -> None:
    for table in reversed(TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("limits")
