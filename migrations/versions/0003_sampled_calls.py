"""Sampled nodes: each call row records a sampled node's k and vote share (nullable).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger_calls") as batch:
        batch.add_column(sa.Column("samples", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("vote_share", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ledger_calls") as batch:
        batch.drop_column("vote_share")
        batch.drop_column("samples")
