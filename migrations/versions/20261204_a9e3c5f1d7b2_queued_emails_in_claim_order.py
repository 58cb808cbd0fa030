"""queued emails indexed in the order the claim takes them

The claim read every due email and sorted them all for the first hundred (a sequential
scan of ``emails`` while a backlog drains, bodies and all); a partial index on
``(next_attempt_at, id)`` of the queued emails lets it read the first hundred in order
and stop.

Revision ID: a9e3c5f1d7b2
Revises: c4d8e1f7a2b9
Create Date: 2026-12-04 02:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "a9e3c5f1d7b2"
down_revision: str | None = "c4d8e1f7a2b9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUED = sa.text("status = 'queued'")


def upgrade() -> None:
    op.create_index(
        "ix_emails_queued_next_attempt_at",
        "emails",
        ["next_attempt_at", "id"],
        schema=SCHEMA,
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )


def downgrade() -> None:
    op.drop_index("ix_emails_queued_next_attempt_at", table_name="emails", schema=SCHEMA)
