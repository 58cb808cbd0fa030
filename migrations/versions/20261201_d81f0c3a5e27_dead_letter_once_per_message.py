"""dead letter once per message

A redelivered message (acks_late, or a producer sending twice) added a second pending
dead letter. Letters now carry a fingerprint of their message (task and payload), unique
among pending letters, and count their deliveries. Letters stored before have none.

Revision ID: d81f0c3a5e27
Revises: c3f1a8d2e6b4
Create Date: 2026-12-01 10:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "d81f0c3a5e27"
down_revision: str | None = "c3f1a8d2e6b4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = "status = 'pending'"


def _schema() -> str | None:
    # Alembic writes ALTER TABLE itself, past the schema translation: name no schema on SQLite.
    return None if op.get_bind().dialect.name == "sqlite" else SCHEMA


def upgrade() -> None:
    op.add_column("dead_letters", sa.Column("fingerprint", sa.String(length=64)), schema=_schema())
    op.add_column(
        "dead_letters",
        sa.Column("deliveries", sa.Integer(), server_default=sa.text("1"), nullable=False),
        schema=_schema(),
    )
    op.create_index(
        "uq_dead_letters_pending_fingerprint",
        "dead_letters",
        ["task_name", "fingerprint"],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text(PENDING),
        sqlite_where=sa.text(PENDING),
    )


def downgrade() -> None:
    op.drop_index("uq_dead_letters_pending_fingerprint", table_name="dead_letters", schema=SCHEMA)
    with op.batch_alter_table("dead_letters", schema=_schema()) as batch:
        batch.drop_column("deliveries")
        batch.drop_column("fingerprint")
