"""task runs

Revision ID: 64ffc140447f
Revises: 4f293d9c023b
Create Date: 2026-11-29 05:14:44.555199
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "64ffc140447f"
down_revision: str | None = "4f293d9c023b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_runs",
        sa.Column("task_name", sa.String(length=100), nullable=False),
        sa.Column("last_finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_state", sa.String(length=20), nullable=False),
        sa.Column("runs", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.PrimaryKeyConstraint("task_name", name=op.f("pk_task_runs")),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("task_runs", schema=SCHEMA)
