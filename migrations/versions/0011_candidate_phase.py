"""what a running candidate is doing now (`quantizing 8/32 layers`, `measuring decode at batch 1 (2/3)`),
written by its job's driver for `status` and the REST job; NULL once it ends

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("candidates") as batch:
        batch.add_column(sa.Column("phase", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("candidates") as batch:
        batch.drop_column("phase")
