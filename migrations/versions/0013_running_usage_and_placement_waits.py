"""Preemption for placement waits and a claim whose cost does not grow with running jobs
(issue 22): the job's `waiting_for` and `waiting_since` (its actor waits for Ray to place it),
and each tenant's running attempts kept as totals in `tenant_usage`
(`running_attempts`, `running_rate`, `running_rate_start`), filled here from the jobs running
at upgrade time.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 05:00:00.000000
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("waiting_for", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("tenant_usage", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("running_attempts", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("running_rate", sa.Float(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("running_rate_start", sa.Float(), server_default="0", nullable=False)
        )
    _fill_running_totals()


_JOB = sa.table(
    "job",
    sa.column("tenant_id", sa.String()),
    sa.column("state", sa.String()),
    sa.column("num_gpus", sa.Float()),
    sa.column("started_at", sa.DateTime(timezone=True)),
)
_USAGE = sa.table(
    "tenant_usage",
    sa.column("tenant_id", sa.String()),
    sa.column("gpu_seconds", sa.Float()),
    sa.column("attempts", sa.Float()),
    sa.column("as_of", sa.DateTime(timezone=True)),
    sa.column("running_attempts", sa.Integer()),
    sa.column("running_rate", sa.Float()),
    sa.column("running_rate_start", sa.Float()),
)


def _fill_running_totals() -> None:
    """The totals of the attempts running now (core/usage.py keeps them from here on)."""
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_JOB.c.tenant_id, _JOB.c.num_gpus, _JOB.c.started_at).where(
            _JOB.c.state.in_(["running", "canceling"]), _JOB.c.started_at.is_not(None)
        )
    ).all()
    totals: dict[str, tuple[int, float, float]] = {}
    for tenant_id, num_gpus, started_at in rows:
        if started_at.tzinfo is None:  # SQLite keeps UTC without its zone
            started_at = started_at.replace(tzinfo=UTC)
        rate = float(num_gpus) if num_gpus else 1.0
        count, rates, rate_start = totals.get(tenant_id, (0, 0.0, 0.0))
        totals[tenant_id] = (count + 1, rates + rate, rate_start + rate * started_at.timestamp())
    have = set(bind.scalars(sa.select(_USAGE.c.tenant_id)))
    for tenant_id, (count, rate, rate_start) in totals.items():
        values = {"running_attempts": count, "running_rate": rate, "running_rate_start": rate_start}
        if tenant_id in have:
            bind.execute(_USAGE.update().where(_USAGE.c.tenant_id == tenant_id).values(**values))
        else:
            bind.execute(
                _USAGE.insert().values(
                    tenant_id=tenant_id,
                    gpu_seconds=0.0,
                    attempts=0.0,
                    as_of=datetime.now(UTC),
                    **values,
                )
            )


def downgrade() -> None:
    with op.batch_alter_table("tenant_usage", schema=None) as batch_op:
        batch_op.drop_column("running_rate_start")
        batch_op.drop_column("running_rate")
        batch_op.drop_column("running_attempts")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("waiting_since")
        batch_op.drop_column("waiting_for")
