"""Initial ledger: requests, upstream calls and daily rollups.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ledger_requests",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("api_key", sa.String(64), nullable=True),
        sa.Column("cascade", sa.String(128), nullable=True),
        sa.Column("model_requested", sa.String(256), nullable=False),
        sa.Column("policy_hash", sa.String(128), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("chosen_model", sa.String(256), nullable=True),
        sa.Column("n_calls", sa.Integer(), nullable=False),
        sa.Column("tokens_in", sa.BigInteger(), nullable=False),
        sa.Column("tokens_out", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Double(), nullable=True),
        sa.Column("reference_cost_usd", sa.Double(), nullable=True),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("overhead_ms", sa.Double(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_requests"),
        sa.UniqueConstraint("request_id", name="uq_ledger_requests_request_id"),
    )
    op.create_index("ix_ledger_requests_ts", "ledger_requests", ["ts"])
    op.create_index("ix_ledger_requests_cascade_ts", "ledger_requests", ["cascade", "ts"])
    op.create_index("ix_ledger_requests_chosen_model_ts", "ledger_requests", ["chosen_model", "ts"])
    op.create_index("ix_ledger_requests_api_key_ts", "ledger_requests", ["api_key", "ts"])

    op.create_table(
        "ledger_calls",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("call_order", sa.Integer(), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("node", sa.Integer(), nullable=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("backend", sa.String(128), nullable=True),
        sa.Column("status", sa.String(64), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("tokens_in", sa.BigInteger(), nullable=True),
        sa.Column("tokens_out", sa.BigInteger(), nullable=True),
        sa.Column("cost_usd", sa.Double(), nullable=True),
        sa.Column("latency_ms", sa.Double(), nullable=True),
        sa.Column("ttft_ms", sa.Double(), nullable=True),
        sa.Column("confidence", sa.Double(), nullable=True),
        sa.Column("p_correct", sa.Double(), nullable=True),
        sa.Column("agreement", sa.Boolean(), nullable=True),
        sa.Column("decision", sa.String(256), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_calls"),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["ledger_requests.request_id"],
            name="fk_ledger_calls_request_id_ledger_requests",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "request_id", "call_order", name="uq_ledger_calls_request_id_call_order"
        ),
    )
    op.create_index("ix_ledger_calls_ts", "ledger_calls", ["ts"])
    op.create_index("ix_ledger_calls_model_ts", "ledger_calls", ["model", "ts"])

    op.create_table(
        "ledger_daily",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("cascade", sa.String(128), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("api_key", sa.String(64), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("requests_failed", sa.BigInteger(), nullable=False),
        sa.Column("unpriced_requests", sa.BigInteger(), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("calls_failed", sa.BigInteger(), nullable=False),
        sa.Column("unpriced_calls", sa.BigInteger(), nullable=False),
        sa.Column("tokens_in", sa.BigInteger(), nullable=False),
        sa.Column("tokens_out", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Double(), nullable=True),
        sa.Column("reference_cost_usd", sa.Double(), nullable=True),
        sa.Column("reference_unpriced", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_daily"),
        sa.UniqueConstraint(
            "day", "cascade", "model", "api_key", name="uq_ledger_daily_day_cascade_model_api_key"
        ),
    )
    op.create_index("ix_ledger_daily_cascade_day", "ledger_daily", ["cascade", "day"])
    op.create_index("ix_ledger_daily_model_day", "ledger_daily", ["model", "day"])
    op.create_index("ix_ledger_daily_api_key_day", "ledger_daily", ["api_key", "day"])


def downgrade() -> None:
    op.drop_table("ledger_daily")
    op.drop_table("ledger_calls")
    op.drop_table("ledger_requests")
