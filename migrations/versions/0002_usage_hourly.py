"""Create usage_hourly, the rollup reports read instead of raw events, and fill it from usage_events.

Revision ID: 0002
Revises: 0001
Create Date: 2024-12-02

Written out in full (see 0001). The backfill aggregates the existing raw rows in one INSERT ... SELECT
inside the migration's transaction, so reports switch to the rollup with nothing missing; from then
on the writer maintains it in the same transaction as each raw insert (meter.db.rollups). On a large
usage_events table the backfill takes as long as one full scan of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TOKENS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens")
KEY = ("hour", "team", "key_fingerprint", "requested_model", "endpoint", "null_dims")

# The start of the row's UTC hour, in the form each backend stores timestamps in (meter.db.types).
HOUR_SQL = {
    "postgresql": "date_trunc('hour', started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
    "sqlite": "substr(started_at, 1, 13) || ':00:00.000000'",
}


def upgrade() -> None:
    op.create_table(
        "usage_hourly",
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("team", sa.Text(), nullable=False),
        sa.Column("key_fingerprint", sa.Text(), nullable=False),
        sa.Column("requested_model", sa.Text(), nullable=False),
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("null_dims", sa.SmallInteger(), nullable=False),
        sa.Column("key_suffix", sa.Text(), nullable=True),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("records_missing_usage", sa.BigInteger(), nullable=False),
        *(
            column
            for name in TOKENS
            for column in (
                sa.Column(name, sa.BigInteger(), nullable=False),
                sa.Column(f"{name}_records", sa.BigInteger(), nullable=False),
            )
        ),
        sa.PrimaryKeyConstraint(*KEY, name="pk_usage_hourly"),
    )
    op.create_index("ix_usage_hourly_team_hour", "usage_hourly", ["team", "hour"])
    op.create_index("ix_usage_hourly_key_fingerprint_hour", "usage_hourly", ["key_fingerprint", "hour"])
    _backfill()


def _backfill() -> None:
    dialect = op.get_context().dialect.name
    if dialect not in HOUR_SQL:
        raise NotImplementedError(f"no usage_hourly backfill for the {dialect} dialect")
    token_columns = ", ".join(f"{name}, {name}_records" for name in TOKENS)
    token_sums = ", ".join(f"COALESCE(SUM({name}), 0), COUNT({name})" for name in TOKENS)
    op.execute(
        f"""
        INSERT INTO usage_hourly ({", ".join(KEY)}, key_suffix, requests, errors, records_missing_usage,
                                  {token_columns})
        SELECT {HOUR_SQL[dialect]},
               team,
               COALESCE(key_fingerprint, ''),
               COALESCE(requested_model, ''),
               endpoint,
               (CASE WHEN key_fingerprint IS NULL THEN 1 ELSE 0 END)
                 + (CASE WHEN requested_model IS NULL THEN 2 ELSE 0 END),
               MAX(key_suffix),
               COUNT(*),
               SUM(CASE WHEN outcome <> 'ok' THEN 1 ELSE 0 END),
               SUM(CASE WHEN usage_source = 'missing' THEN 1 ELSE 0 END),
               {token_sums}
        FROM usage_events
        GROUP BY 1, 2, 3, 4, 5, 6
        """
    )


def downgrade() -> None:
    op.drop_index("ix_usage_hourly_key_fingerprint_hour", table_name="usage_hourly")
    op.drop_index("ix_usage_hourly_team_hour", table_name="usage_hourly")
    op.drop_table("usage_hourly")
