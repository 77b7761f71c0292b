"""statistics and early stopping: per-item scores, confidence/policy/early stopping per job

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("confidence", sa.Float(), nullable=False, server_default="0.95"))
        batch.add_column(sa.Column("policy", sa.String(length=16), nullable=False, server_default="point"))
        batch.add_column(sa.Column("early_stop", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("candidates") as batch:
        batch.add_column(sa.Column("n_truncated", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("early_stop", sa.JSON(), nullable=True))
    with op.batch_alter_table("item_results") as batch:
        batch.add_column(sa.Column("score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("truncated", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("item_results") as batch:
        batch.drop_column("truncated")
        batch.drop_column("score")
    with op.batch_alter_table("candidates") as batch:
        batch.drop_column("early_stop")
        batch.drop_column("n_truncated")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("early_stop")
        batch.drop_column("policy")
        batch.drop_column("confidence")
