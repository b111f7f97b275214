"""Teams, keys, operator prices, audit log and the tenancy change marker; per-request cost.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

Written out in full (see 0001). Keys are stored as HMAC fingerprints only, prices as integer nano-USD
per 1M tokens (meter.db.tenancy_models). usage_events gains ``cost_nanos`` and ``price_ref`` (NULL:
nothing priced the record), usage_hourly their sum and ``unpriced_requests``.

Every record stored before this revision is unpriced: the backfill counts the ones with token usage
in ``usage_hourly.unpriced_requests`` (raw events already removed by retention cannot be counted).
Price them afterwards with ``meter billing rerate --since ... --until ...``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ROLLUP_KEY = ("hour", "team", "key_fingerprint", "requested_model", "endpoint", "null_dims")
# The start of the row's UTC hour, as each backend stores timestamps (frozen copy of 0002's).
HOUR_SQL = {
    "postgresql": "date_trunc('hour', started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
    "sqlite": "substr(started_at, 1, 13) || ':00:00.000000'",
}


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("upstream_credential", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_teams"),
        sa.UniqueConstraint("name", name="uq_teams_name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("team_id", AUTO_ID, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("suffix", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], name="fk_api_keys_team_id_teams"),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("fingerprint", name="uq_api_keys_fingerprint"),
    )
    op.create_index("ix_api_keys_team_id", "api_keys", ["team_id"])
    op.create_table(
        "prices",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("input_nanos", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_nanos", sa.BigInteger(), nullable=True),
        sa.Column("output_nanos", sa.BigInteger(), nullable=False),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_prices"),
    )
    op.create_index("ix_prices_model_effective_from", "prices", ["model", "effective_from"])
    op.create_table(
        "audit_log",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("detail", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    state = op.create_table(
        "tenancy_state",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tenancy_state"),
    )
    op.bulk_insert(state, [{"id": 1, "version": 0}])

    with op.batch_alter_table("usage_events") as events:
        events.add_column(sa.Column("cost_nanos", sa.BigInteger(), nullable=True))
        events.add_column(sa.Column("price_ref", sa.Text(), nullable=True))
    with op.batch_alter_table("usage_hourly") as hourly:
        hourly.add_column(sa.Column("cost_nanos", sa.BigInteger(), nullable=False, server_default="0"))
        hourly.add_column(sa.Column("unpriced_requests", sa.BigInteger(), nullable=False, server_default="0"))
    _backfill_unpriced()


def _backfill_unpriced() -> None:
    dialect = op.get_context().dialect.name
    if dialect not in HOUR_SQL:
        raise NotImplementedError(f"no usage_hourly backfill for the {dialect} dialect")
    match = " AND ".join(f"usage_hourly.{name} = s.{name}" for name in ROLLUP_KEY)
    op.execute(
        f"""
        UPDATE usage_hourly SET unpriced_requests = s.n
        FROM (
            SELECT {HOUR_SQL[dialect]} AS hour,
                   team,
                   COALESCE(key_fingerprint, '') AS key_fingerprint,
                   COALESCE(requested_model, '') AS requested_model,
                   endpoint,
                   (CASE WHEN key_fingerprint IS NULL THEN 1 ELSE 0 END)
                     + (CASE WHEN requested_model IS NULL THEN 2 ELSE 0 END) AS null_dims,
                   COUNT(*) AS n
            FROM usage_events
            WHERE prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL OR total_tokens IS NOT NULL
            GROUP BY 1, 2, 3, 4, 5, 6
        ) AS s
        WHERE {match}
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_hourly") as hourly:
        hourly.drop_column("unpriced_requests")
        hourly.drop_column("cost_nanos")
    with op.batch_alter_table("usage_events") as events:
        events.drop_column("price_ref")
        events.drop_column("cost_nanos")
    op.drop_table("tenancy_state")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_index("ix_prices_model_effective_from", table_name="prices")
    op.drop_table("prices")
    op.drop_index("ix_api_keys_team_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("teams")
