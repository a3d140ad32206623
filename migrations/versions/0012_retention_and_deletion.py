"""Retention and deletion (issue 17): tenants get retention overrides, a job records when its
outputs were purged, a model version its measured size, and `retention_counter` keeps what
deletion has freed.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 05:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenant", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retain_outputs_days", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("retain_events_days", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("retain_jobs_days", sa.Integer(), nullable=True))
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("outputs_purged_at", sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("model", schema=None) as batch_op:
        batch_op.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=True))
    op.create_table(
        "retention_counter",
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("item", sa.String(length=16), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("source", "item"),
    )


def downgrade() -> None:
    op.drop_table("retention_counter")
    with op.batch_alter_table("model", schema=None) as batch_op:
        batch_op.drop_column("size_bytes")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("outputs_purged_at")
    with op.batch_alter_table("tenant", schema=None) as batch_op:
        batch_op.drop_column("retain_jobs_days")
        batch_op.drop_column("retain_events_days")
        batch_op.drop_column("retain_outputs_days")
