"""Create usage_events: one row per metered request.

Revision ID: 0001
Revises:
Create Date: 2024-11-22

Written out in full rather than imported from meter.db.models: a migration is a frozen snapshot, and
later model changes must not rewrite what 0001 did. tests/db/test_migrations.py checks that head
matches the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_events",
        sa.Column("event_id", sa.String(32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("usage_source", sa.String(32), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("key_fingerprint", sa.Text(), nullable=True),
        sa.Column("key_suffix", sa.Text(), nullable=True),
        sa.Column("team", sa.Text(), nullable=False),
        sa.Column("requested_model", sa.Text(), nullable=True),
        sa.Column("response_model", sa.Text(), nullable=True),
        sa.Column("response_id", sa.Text(), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("finish_reason", sa.Text(), nullable=True),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=True),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=True),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=True),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=True),
        sa.Column("total_tokens", sa.BigInteger(), nullable=True),
        sa.Column("duration_ms", sa.Double(), nullable=True),
        sa.Column("upstream_headers_ms", sa.Double(), nullable=True),
        sa.Column("ttft_ms", sa.Double(), nullable=True),
        sa.Column("output_tokens_per_second", sa.Double(), nullable=True),
        sa.Column("overhead_ms", sa.Double(), nullable=True),
        sa.Column("server_ttft_ms", sa.Double(), nullable=True),
        sa.Column("server_processing_ms", sa.Double(), nullable=True),
        sa.Column(
            "upstream_metrics", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("request_bytes", sa.BigInteger(), nullable=False),
        sa.Column("response_bytes", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("event_id", name="pk_usage_events"),
    )
    op.create_index("ix_usage_events_started_at", "usage_events", ["started_at"])
    op.create_index("ix_usage_events_team_started_at", "usage_events", ["team", "started_at"])
    op.create_index(
        "ix_usage_events_key_fingerprint_started_at", "usage_events", ["key_fingerprint", "started_at"]
    )
    op.create_index(
        "ix_usage_events_requested_model_started_at", "usage_events", ["requested_model", "started_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_usage_events_requested_model_started_at", table_name="usage_events")
    op.drop_index("ix_usage_events_key_fingerprint_started_at", table_name="usage_events")
    op.drop_index("ix_usage_events_team_started_at", table_name="usage_events")
    op.drop_index("ix_usage_events_started_at", table_name="usage_events")
    op.drop_table("usage_events")
