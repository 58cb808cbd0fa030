"""email activity clock and settled follow-ups

``last_activity_at`` is the retention clock: housekeeping writes move ``updated_at`` but
not it. Existing rows start from ``updated_at``, the clock retention read so far (it can
only keep a body longer, never redact one early). ``follow_up_settled_at`` marks emails
the follow-up check found nothing left to discuss for, so that it takes them up once;
``ix_emails_follow_up_due`` holds the check's candidates only, so its daily work does not
grow with every email ever sent.

Revision ID: 5e7d2c41a9b3
Revises: 9a1c3e7b5d20
Create Date: 2026-12-01 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "5e7d2c41a9b3"
down_revision: str | None = "9a1c3e7b5d20"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str | None:
    # Alembic writes ALTER TABLE itself, past the schema translation: name no schema on SQLite.
    return None if op.get_bind().dialect.name == "sqlite" else SCHEMA


# As in the model (models/email.py FOLLOW_UP_DUE), frozen here as of this revision.
FOLLOW_UP_DUE = (
    "template IN ('initial_contact', 'batch_request') AND status = 'sent'"
    " AND response_received IS false AND follow_up_required IS false"
    " AND call_requested_at IS NULL AND follow_up_settled_at IS NULL"
)


def upgrade() -> None:
    with op.batch_alter_table("emails", schema=_schema()) as batch:
        batch.add_column(sa.Column("follow_up_settled_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("last_activity_at", sa.DateTime(timezone=True)))
    emails = sa.table(
        "emails", sa.column("last_activity_at"), sa.column("updated_at"), schema=_schema()
    )
    op.execute(emails.update().values(last_activity_at=emails.c.updated_at))
    with op.batch_alter_table("emails", schema=_schema()) as batch:
        batch.alter_column(
            "last_activity_at", existing_type=sa.DateTime(timezone=True), nullable=False
        )
    op.create_index(
        "ix_emails_last_activity_at",
        "emails",
        ["last_activity_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("body_redacted_at IS NULL"),
        sqlite_where=sa.text("body_redacted_at IS NULL"),
    )
    op.create_index(
        "ix_emails_follow_up_due",
        "emails",
        ["sent_at"],
        schema=SCHEMA,
        postgresql_where=sa.text(FOLLOW_UP_DUE),
        sqlite_where=sa.text(FOLLOW_UP_DUE),
    )


def downgrade() -> None:
    op.drop_index("ix_emails_follow_up_due", table_name="emails", schema=SCHEMA)
    op.drop_index("ix_emails_last_activity_at", table_name="emails", schema=SCHEMA)
    with op.batch_alter_table("emails", schema=_schema()) as batch:
        batch.drop_column("last_activity_at")
        batch.drop_column("follow_up_settled_at")
