"""which Ray job drives a job submitted to a cluster (`submit --address`, `resume --address`): the
cluster's dashboard address and the submission id, so that `status` can ask whether that driver still
lives; NULL for a job driven here or by the API server

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("ray_address", sa.Text(), nullable=True))
        batch.add_column(sa.Column("ray_submission", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("ray_submission")
        batch.drop_column("ray_address")
