"""scheduling: tenant weights and quotas, fair-share state, schedules, job backoff and slots

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-30 03:47:39.016081
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fair_share",
        sa.Column("queue", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("pass_value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("queue", "tenant_id"),
    )
    op.create_table(
        "schedule",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("cron", sa.String(length=128), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column(
            "template",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_job_id", sa.String(length=36), nullable=True),
        sa.Column("fired_count", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenant.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name"),
    )
    with op.batch_alter_table("schedule", schema=None) as batch_op:
        batch_op.create_index("ix_schedule_due", ["paused", "next_run_at"], unique=False)

    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("num_gpus", sa.Float(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("schedule_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("slot_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            "ix_job_claim",
            ["state", "queue", "tenant_id", "priority", "created_at", "id"],
            unique=False,
        )
        batch_op.create_unique_constraint("uq_job_schedule_slot", ["schedule_id", "slot_at"])
        batch_op.create_index(
            "ix_job_model_finished", ["model_id", "state", "finished_at"], unique=False
        )

    with op.batch_alter_table("tenant", schema=None) as batch_op:
        batch_op.add_column(sa.Column("weight", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("max_running", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_queued", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("gpu_seconds_budget", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("budget_period_s", sa.Integer(), server_default="86400", nullable=False)
        )
        batch_op.add_column(
            sa.Column("over_quota", sa.String(length=8), server_default="reject", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("tenant", schema=None) as batch_op:
        batch_op.drop_column("over_quota")
        batch_op.drop_column("budget_period_s")
        batch_op.drop_column("gpu_seconds_budget")
        batch_op.drop_column("max_queued")
        batch_op.drop_column("max_running")
        batch_op.drop_column("weight")

    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_model_finished")
        batch_op.drop_constraint("uq_job_schedule_slot", type_="unique")
        batch_op.drop_index("ix_job_claim")
        batch_op.drop_column("slot_at")
        batch_op.drop_column("schedule_id")
        batch_op.drop_column("num_gpus")
        batch_op.drop_column("not_before")

    with op.batch_alter_table("schedule", schema=None) as batch_op:
        batch_op.drop_index("ix_schedule_due")

    op.drop_table("schedule")
    op.drop_table("fair_share")
