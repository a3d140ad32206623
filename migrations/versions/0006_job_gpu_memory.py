"""Job resources: the GPU memory a training job asked for (`resources.gpu_memory_gb`), reserved
through the Ray custom resource of the same name. Existing rows asked for none.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 04:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gpu_memory_gb", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("gpu_memory_gb")
