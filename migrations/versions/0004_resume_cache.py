"""distributed sweeps that survive: driver heartbeat and cancel request per job, cache opt-out; per
candidate the worker attempts, the cache key and the job a reused result came from

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("use_cache", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("driver", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("candidates") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("reused_from", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("items_carried", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("cache_key", sa.String(length=64), nullable=True))
        batch.create_index("ix_candidates_cache_key", ["cache_key"])


def downgrade() -> None:
    with op.batch_alter_table("candidates") as batch:
        batch.drop_index("ix_candidates_cache_key")
        batch.drop_column("cache_key")
        batch.drop_column("items_carried")
        batch.drop_column("reused_from")
        batch.drop_column("attempts")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("heartbeat_at")
        batch.drop_column("driver")
        batch.drop_column("cancel_requested")
        batch.drop_column("use_cache")
