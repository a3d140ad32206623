"""Model status: a pretrained folder registered with POST /v1/models is `checking` until a
worker has loaded it, then `ready` or `failed` with the reason in status_detail. Existing rows
(trained models, built-ins) are `ready`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 04:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("status", sa.String(length=16), server_default="ready", nullable=False)
        )
        batch_op.add_column(sa.Column("status_detail", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model", schema=None) as batch_op:
        batch_op.drop_column("status_detail")
        batch_op.drop_column("status")
