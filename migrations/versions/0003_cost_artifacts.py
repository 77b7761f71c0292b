"""precisions, artifacts and costs: target GPU and model shape per job, calibration split, artifact
and throughput measurements per candidate

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("target_gpu", sa.String(length=32), nullable=False, server_default="H100-80GB"))
        batch.add_column(sa.Column("model_config", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("calibration", sa.JSON(), nullable=True))
    with op.batch_alter_table("candidates") as batch:
        batch.alter_column("throughput_engine", type_=sa.String(length=200), existing_type=sa.String(length=64))
        batch.add_column(sa.Column("prefill_tokens_per_second", sa.Float(), nullable=True))
        batch.add_column(sa.Column("decode_tokens_per_second_b16", sa.Float(), nullable=True))
        batch.add_column(sa.Column("disk_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("artifact_path", sa.Text(), nullable=True))
        batch.add_column(sa.Column("artifact_reused", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("candidates") as batch:
        batch.drop_column("artifact_reused")
        batch.drop_column("artifact_path")
        batch.drop_column("disk_bytes")
        batch.drop_column("decode_tokens_per_second_b16")
        batch.drop_column("prefill_tokens_per_second")
        batch.alter_column("throughput_engine", type_=sa.String(length=64), existing_type=sa.String(length=200))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("calibration")
        batch.drop_column("model_config")
        batch.drop_column("target_gpu")
