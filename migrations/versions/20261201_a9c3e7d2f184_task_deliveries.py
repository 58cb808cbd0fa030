"""task deliveries

A message that kills the process running it is delivered again and again: each start
of a task is counted here, per message and attempt, and the row removed when the task
returns. A message that arrives with too many unfinished starts is a dead letter.

Revision ID: a9c3e7d2f184
Revises: f2a6c9d1b3e8
Create Date: 2026-12-01 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "a9c3e7d2f184"
down_revision: str | None = "f2a6c9d1b3e8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_deliveries",
        sa.Column("task_id", sa.String(length=200), nullable=False),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("task_name", sa.String(length=100), nullable=False),
        sa.Column("deliveries", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("last_delivered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("task_id", "retries", name=op.f("pk_task_deliveries")),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("task_deliveries", schema=SCHEMA)
