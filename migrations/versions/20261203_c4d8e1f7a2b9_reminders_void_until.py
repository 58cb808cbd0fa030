"""the time up to which an email's answers void its reminders

An answer cancels the reminders of its email queued until it was known; one of them on
its way then (claimed, ``sending``) is left to its send, and may come back unsent (the
run stopped first, or the server said "try later"). ``reminders_void_until`` keeps that
time on the answered email, so that the claim cancels such a reminder instead of
sending it.

Revision ID: c4d8e1f7a2b9
Revises: b7e4c2d9a1f6
Create Date: 2026-12-03 18:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "c4d8e1f7a2b9"
down_revision: str | None = "b7e4c2d9a1f6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str | None:
    # Alembic writes ALTER TABLE itself, past the schema translation: name no schema on SQLite.
    return None if op.get_bind().dialect.name == "sqlite" else SCHEMA


def upgrade() -> None:
    op.add_column(
        "emails", sa.Column("reminders_void_until", sa.DateTime(timezone=True)), schema=_schema()
    )


def downgrade() -> None:
    op.drop_column("emails", "reminders_void_until", schema=_schema())
