"""call retention clock, and free text left behind by erasure and retention

``phone_calls.last_activity_at`` is the calls' retention clock (as ``emails``'s), from
``updated_at`` for existing rows; ``text_redacted_at`` says when a call's free text
(notes, outcome, notes per request) was removed. Partial indexes find what retention
still has to redact: calls by their last activity, status reasons by the request's last
event.

Free text that erasure and retention missed before is removed once here: answers and
notes per request of emails already redacted; the status reasons, calls' text and notes
per request about patients already erased.

Revision ID: d7a3f1c9e2b4
Revises: d81f0c3a5e27
Create Date: 2026-12-01 10:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "d7a3f1c9e2b4"
down_revision: str | None = "d81f0c3a5e27"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str | None:
    # Alembic writes ALTER TABLE itself, past the schema translation: name no schema on SQLite.
    return None if op.get_bind().dialect.name == "sqlite" else SCHEMA


def _remove_left_over_text() -> None:
    schema = _schema()
    emails = sa.table(
        "emails",
        sa.column("id"),
        sa.column("response_content"),
        sa.column("body_redacted_at"),
        schema=schema,
    )
    email_batches = sa.table(
        "email_batches", sa.column("email_id"), sa.column("response_notes"), schema=schema
    )
    patients = sa.table("patients", sa.column("id"), sa.column("erased_at"), schema=schema)
    requests = sa.table(
        "placement_requests",
        sa.column("id"),
        sa.column("patient_id"),
        sa.column("status_reason"),
        schema=schema,
    )
    calls = sa.table(
        "phone_calls",
        sa.column("id"),
        sa.column("notes"),
        sa.column("outcome"),
        sa.column("text_redacted_at"),
        schema=schema,
    )
    call_batches = sa.table(
        "phone_call_batches",
        sa.column("phone_call_id"),
        sa.column("placement_request_id"),
        sa.column("follow_up_notes"),
        schema=schema,
    )
    redacted_emails = sa.select(emails.c.id).where(emails.c.body_redacted_at.is_not(None))
    op.execute(
        emails.update()
        .where(emails.c.body_redacted_at.is_not(None))
        .where(emails.c.response_content.is_not(None))
        .values(response_content=None)
    )
    op.execute(
        email_batches.update()
        .where(email_batches.c.email_id.in_(redacted_emails))
        .where(email_batches.c.response_notes.is_not(None))
        .values(response_notes=None)
    )
    erased = sa.select(patients.c.id).where(patients.c.erased_at.is_not(None))
    erased_requests = sa.select(requests.c.id).where(requests.c.patient_id.in_(erased))
    op.execute(
        requests.update()
        .where(requests.c.patient_id.in_(erased))
        .where(requests.c.status_reason.is_not(None))
        .values(status_reason=None)
    )
    erased_calls = sa.select(call_batches.c.phone_call_id).where(
        call_batches.c.placement_request_id.in_(erased_requests)
    )
    op.execute(
        call_batches.update()
        .where(call_batches.c.phone_call_id.in_(erased_calls))
        .values(follow_up_notes=None)
    )
    op.execute(
        calls.update()
        .where(calls.c.id.in_(erased_calls))
        .values(notes=None, outcome=None, text_redacted_at=sa.func.current_timestamp())
    )


# Only for the ALTER: every row gets its value from ``updated_at`` right after, and every
# new row one from the model.
_EPOCH = "1970-01-01 00:00:00+00:00"


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    # Added in place, never by copying the table: on SQLite a copied and dropped
    # phone_calls would take its phone_call_batches along (ON DELETE CASCADE, with
    # foreign keys on). A NOT NULL column needs a constant default to be added there.
    op.add_column(
        "phone_calls",
        sa.Column(
            "last_activity_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text(f"'{_EPOCH}'"),
        ),
        schema=_schema(),
    )
    op.add_column(
        "phone_calls", sa.Column("text_redacted_at", sa.DateTime(timezone=True)), schema=_schema()
    )
    calls = sa.table(
        "phone_calls", sa.column("last_activity_at"), sa.column("updated_at"), schema=_schema()
    )
    op.execute(calls.update().values(last_activity_at=calls.c.updated_at))
    if not sqlite:
        # As in the model: the value comes from the code. (SQLite keeps the constant: it
        # could drop it only by copying the table.)
        op.alter_column(
            "phone_calls",
            "last_activity_at",
            existing_type=sa.DateTime(timezone=True),
            server_default=None,
            schema=SCHEMA,
        )
    op.create_index(
        "ix_phone_calls_last_activity_at",
        "phone_calls",
        ["last_activity_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("text_redacted_at IS NULL"),
        sqlite_where=sa.text("text_redacted_at IS NULL"),
    )
    op.create_index(
        "ix_placement_requests_status_reason_kept",
        "placement_requests",
        ["last_event_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("status_reason IS NOT NULL"),
        sqlite_where=sa.text("status_reason IS NOT NULL"),
    )
    _remove_left_over_text()


def downgrade() -> None:
    op.drop_index(
        "ix_placement_requests_status_reason_kept", table_name="placement_requests", schema=SCHEMA
    )
    op.drop_index("ix_phone_calls_last_activity_at", table_name="phone_calls", schema=SCHEMA)
    # In place (SQLite 3.35+ drops a column natively), for the reason of upgrade().
    op.drop_column("phone_calls", "text_redacted_at", schema=_schema())
    op.drop_column("phone_calls", "last_activity_at", schema=_schema())
