"""Usage-based fair share and preemption at checkpoints: the `tenant_usage` table (decayed
GPU-seconds per tenant), the tenant's preemption settings (`preemptible`, `may_opt_out`) and the
job's (`preemptible`, `preempt_count`, `preempted_by`, `preempt_requested_at`), and the index
the claim reads running jobs' cost from. Existing tenants and jobs are preemptible, none may
opt out, and no usage is recorded yet.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 01:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tenant_usage",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("gpu_seconds", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Float(), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id"),
    )
    with op.batch_alter_table("tenant", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("preemptible", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("may_opt_out", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("preemptible", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("preempt_count", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("preempted_by", sa.String(length=36), nullable=True))
        batch_op.add_column(
            sa.Column("preempt_requested_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_index(
            "ix_job_running_usage", ["state", "tenant_id", "started_at", "num_gpus"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_running_usage")
        batch_op.drop_column("preempt_requested_at")
        batch_op.drop_column("preempted_by")
        batch_op.drop_column("preempt_count")
        batch_op.drop_column("preemptible")
    with op.batch_alter_table("tenant", schema=None) as batch_op:
        batch_op.drop_column("may_opt_out")
        batch_op.drop_column("preemptible")
    op.drop_table("tenant_usage")
