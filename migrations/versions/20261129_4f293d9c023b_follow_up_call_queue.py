"""follow-up call queue

Revision ID: 4f293d9c023b
Revises: 08e298e5940f
Create Date: 2026-11-29 04:43:40.785912
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "4f293d9c023b"
down_revision: str | None = "08e298e5940f"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str | None:
    # Alembic writes ALTER TABLE itself, past the schema translation: name no schema on SQLite.
    return None if op.get_bind().dialect.name == "sqlite" else SCHEMA


def upgrade() -> None:
    op.add_column(
        "emails",
        sa.Column("call_requested_at", sa.DateTime(timezone=True), nullable=True),
        schema=_schema(),
    )
    op.create_index(
        "ix_emails_call_requested_at",
        "emails",
        ["call_requested_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("call_requested_at IS NOT NULL"),
        sqlite_where=sa.text("call_requested_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_emails_call_requested_at", table_name="emails", schema=SCHEMA)
    op.drop_column("emails", "call_requested_at", schema=_schema())
