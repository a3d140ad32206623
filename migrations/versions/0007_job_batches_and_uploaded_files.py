"""Job batches (`POST /v1/batches`, OpenAI batch files) and the files uploaded through the
OpenAI-compatible API: a `job_batch` table, a job's `batch_id` and `batch_item`, and an
`uploaded_file` table. Existing jobs belong to no batch.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 01:37:02.400949
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "job_batch",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("endpoint", sa.String(length=64), nullable=True),
        sa.Column("input_file_id", sa.String(length=64), nullable=True),
        sa.Column("meta", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("canceled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "idempotency_key"),
    )
    with op.batch_alter_table("job_batch", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_batch_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "uploaded_file",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("uploaded_file", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_uploaded_file_tenant_id"), ["tenant_id"], unique=False)

    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batch_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("batch_item", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_job_batch_id"), ["batch_id"], unique=False)
        batch_op.create_foreign_key("fk_job_batch_id_job_batch", "job_batch", ["batch_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_constraint("fk_job_batch_id_job_batch", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_job_batch_id"))
        batch_op.drop_column("batch_item")
        batch_op.drop_column("batch_id")

    with op.batch_alter_table("uploaded_file", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_uploaded_file_tenant_id"))
    op.drop_table("uploaded_file")

    with op.batch_alter_table("job_batch", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_batch_tenant_id"))
    op.drop_table("job_batch")
