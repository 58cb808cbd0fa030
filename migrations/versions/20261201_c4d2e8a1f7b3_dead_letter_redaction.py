"""dead letter redaction

A dead letter's payload loses its health data when the patient is erased or the
retention period is over; ``payload_redacted_at`` says when, and stops its replay.

Revision ID: c4d2e8a1f7b3
Revises: c4e2a7d91b36
Create Date: 2026-12-01 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "c4d2e8a1f7b3"
down_revision: str | None = "c4e2a7d91b36"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str | None:
    # Alembic writes ALTER TABLE itself, past the schema translation: name no schema on SQLite.
    return None if op.get_bind().dialect.name == "sqlite" else SCHEMA


def upgrade() -> None:
    with op.batch_alter_table("dead_letters", schema=_schema()) as batch:
        batch.add_column(
            sa.Column("payload_redacted_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("dead_letters", schema=_schema()) as batch:
        batch.drop_column("payload_redacted_at")
