"""reminders by their email

An answer cancels the unsent reminders of its email, found by ``in_reply_to_email_id``:
without an index every answer read the whole emails table.

Revision ID: b7e4c2d9a1f6
Revises: a9c3e7d2f184
Create Date: 2026-12-01 16:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "b7e4c2d9a1f6"
down_revision: str | None = "a9c3e7d2f184"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_emails_in_reply_to_email_id",
        "emails",
        ["in_reply_to_email_id"],
        schema=SCHEMA,
        postgresql_where=sa.text("in_reply_to_email_id IS NOT NULL"),
        sqlite_where=sa.text("in_reply_to_email_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_emails_in_reply_to_email_id", table_name="emails", schema=SCHEMA)
