"""Token-logprob signals: each call row records its answer's logprob summary (nullable).

The proxy reads, per call, the mean, minimum, 5% and 25% quantiles of the answer's token
logprobs (policies/freetext.py); the free-text calibrators read them, so the ledger keeps them
beside `confidence` to audit and refit from. NULL where no summary was read (the upstream sent
no logprobs), and for rows written before this revision.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = ("lp_mean", "lp_min", "lp_q05", "lp_q25")


def upgrade() -> None:
    with op.batch_alter_table("ledger_calls") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ledger_calls") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
