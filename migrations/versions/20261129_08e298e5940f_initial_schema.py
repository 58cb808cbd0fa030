"""initial schema

Revision ID: 08e298e5940f
Revises:
Create Date: 2026-11-29 03:48:37.848488
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from comms_tasks.models.base import SCHEMA

revision: str = "08e298e5940f"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("task_name", sa.String(length=100), nullable=False),
        sa.Column("message_id", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "replayed",
                name="dead_letter_status",
                native_enum=False,
                create_constraint=True,
                schema=SCHEMA,
            ),
            nullable=False,
        ),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replay_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_dead_letters_status_id", "dead_letters", ["status", "id"], unique=False, schema=SCHEMA
    )
    op.create_table(
        "emails",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("therapist_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "template",
            sa.Enum(
                "initial_contact",
                "batch_request",
                "follow_up",
                "confirmation",
                name="email_template",
                native_enum=False,
                create_constraint=True,
                schema=SCHEMA,
            ),
            nullable=False,
        ),
        sa.Column("dedup_key", sa.String(length=200), nullable=False),
        sa.Column("recipient_email", sa.String(length=254), nullable=False),
        sa.Column("recipient_name", sa.String(length=300), nullable=False),
        sa.Column("sender_email", sa.String(length=254), nullable=False),
        sa.Column("sender_name", sa.String(length=200), nullable=False),
        sa.Column("reply_to", sa.String(length=254), nullable=True),
        sa.Column("subject", sa.String(length=300), nullable=False),
        sa.Column("body_html", sa.Text(), nullable=False),
        sa.Column("body_text", sa.Text(), nullable=False),
        sa.Column("message_id", sa.String(length=300), nullable=False),
        sa.Column("in_reply_to_email_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "draft",
                "queued",
                "sending",
                "sent",
                "failed",
                "cancelled",
                name="email_status",
                native_enum=False,
                create_constraint=True,
                schema=SCHEMA,
            ),
            nullable=False,
        ),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("retry_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "response_received", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("response_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("response_content", sa.Text(), nullable=True),
        sa.Column(
            "follow_up_required", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("follow_up_notes", sa.Text(), nullable=True),
        sa.Column("body_redacted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["in_reply_to_email_id"],
            [f"{SCHEMA}.emails.id"],
            name=op.f("fk_emails_in_reply_to_email_id_emails"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_emails")),
        sa.UniqueConstraint("dedup_key", name=op.f("uq_emails_dedup_key")),
        sa.UniqueConstraint("message_id", name=op.f("uq_emails_message_id")),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_emails_status_next_attempt_at",
        "emails",
        ["status", "next_attempt_at"],
        unique=False,
        schema=SCHEMA,
    )
    op.create_index(
        "ix_emails_therapist_id_status",
        "emails",
        ["therapist_id", "status"],
        unique=False,
        schema=SCHEMA,
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("event_type", sa.String(length=100), nullable=False),
        sa.Column(
            "envelope",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_outbox_event_id")),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        unique=False,
        schema=SCHEMA,
        postgresql_where=sa.text("published_at IS NULL"),
        sqlite_where=sa.text("published_at IS NULL"),
    )
    op.create_table(
        "patients",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("registered_on", sa.Date(), nullable=True),
        sa.Column("diagnosis", sa.Text(), nullable=True),
        sa.Column("gender", sa.Text(), nullable=True),
        sa.Column("time_availability", sa.Text(), nullable=True),
        sa.Column("symptoms_since", sa.Text(), nullable=True),
        sa.Column("open_to_group_therapy", sa.Boolean(), nullable=True),
        sa.Column("therapy_experience", sa.Text(), nullable=True),
        sa.Column("current_complaints", sa.Text(), nullable=True),
        sa.Column("summary_event_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patients")),
        schema=SCHEMA,
    )
    op.create_table(
        "placement_requests",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("patient_id", sa.BigInteger(), nullable=False),
        sa.Column("therapist_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "open",
                "in_progress",
                "accepted",
                "rejected",
                "cancelled",
                name="placement_request_status",
                native_enum=False,
                create_constraint=True,
                schema=SCHEMA,
            ),
            nullable=False,
        ),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_event_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_placement_requests")),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_placement_requests_patient_id",
        "placement_requests",
        ["patient_id"],
        unique=False,
        schema=SCHEMA,
    )
    op.create_index(
        "ix_placement_requests_therapist_status",
        "placement_requests",
        ["therapist_id", "status"],
        unique=False,
        schema=SCHEMA,
    )
    op.create_table(
        "processed_messages",
        sa.Column("message_id", sa.String(length=36), nullable=False),
        sa.Column("task_name", sa.String(length=100), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_processed_messages")),
        schema=SCHEMA,
    )
    op.create_table(
        "therapists",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("salutation", sa.String(length=20), nullable=True),
        sa.Column("title", sa.String(length=50), nullable=True),
        sa.Column("first_name", sa.String(length=200), nullable=False),
        sa.Column("last_name", sa.String(length=200), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=True),
        sa.Column("phone", sa.String(length=50), nullable=True),
        sa.Column(
            "phone_availability",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "status",
            sa.Enum(
                "active",
                "blocked",
                "inactive",
                name="therapist_status",
                native_enum=False,
                create_constraint=True,
                schema=SCHEMA,
            ),
            nullable=False,
        ),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_event_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_therapists")),
        schema=SCHEMA,
    )
    op.create_table(
        "email_batches",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("email_id", sa.BigInteger(), nullable=False),
        sa.Column("placement_request_id", sa.BigInteger(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("included", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column(
            "response_outcome",
            sa.Enum(
                "accepted",
                "rejected",
                "needs_follow_up",
                name="response_outcome",
                native_enum=False,
                create_constraint=True,
                schema=SCHEMA,
            ),
            nullable=True,
        ),
        sa.Column("response_notes", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["email_id"],
            [f"{SCHEMA}.emails.id"],
            name=op.f("fk_email_batches_email_id_emails"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_email_batches")),
        sa.UniqueConstraint(
            "email_id",
            "placement_request_id",
            name=op.f("uq_email_batches_email_id_placement_request_id"),
        ),
        sa.UniqueConstraint(
            "email_id", "priority", name=op.f("uq_email_batches_email_id_priority")
        ),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_email_batches_placement_request_id",
        "email_batches",
        ["placement_request_id"],
        unique=False,
        schema=SCHEMA,
    )
    op.create_table(
        "phone_calls",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("therapist_id", sa.BigInteger(), nullable=False),
        sa.Column("email_id", sa.BigInteger(), nullable=True),
        sa.Column("previous_call_id", sa.BigInteger(), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("dedup_key", sa.String(length=200), nullable=False),
        sa.Column("scheduled_date", sa.Date(), nullable=False),
        sa.Column("scheduled_time", sa.Time(), nullable=False),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_minutes", sa.Integer(), server_default=sa.text("5"), nullable=False),
        sa.Column("actual_date", sa.Date(), nullable=True),
        sa.Column("actual_time", sa.Time(), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "scheduled",
                "completed",
                "failed",
                "cancelled",
                name="phone_call_status",
                native_enum=False,
                create_constraint=True,
                schema=SCHEMA,
            ),
            nullable=False,
        ),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("retry_after", sa.Date(), nullable=True),
        sa.Column(
            "follow_up_required", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("follow_up_notes", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["email_id"],
            [f"{SCHEMA}.emails.id"],
            name=op.f("fk_phone_calls_email_id_emails"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["previous_call_id"],
            [f"{SCHEMA}.phone_calls.id"],
            name=op.f("fk_phone_calls_previous_call_id_phone_calls"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_phone_calls")),
        sa.UniqueConstraint("dedup_key", name=op.f("uq_phone_calls_dedup_key")),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_phone_calls_status_scheduled_at",
        "phone_calls",
        ["status", "scheduled_at"],
        unique=False,
        schema=SCHEMA,
    )
    op.create_index(
        "ix_phone_calls_therapist_id_scheduled_at",
        "phone_calls",
        ["therapist_id", "scheduled_at"],
        unique=False,
        schema=SCHEMA,
    )
    op.create_table(
        "phone_call_batches",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("phone_call_id", sa.BigInteger(), nullable=False),
        sa.Column("placement_request_id", sa.BigInteger(), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("discussed", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column(
            "outcome",
            sa.Enum(
                "accepted",
                "rejected",
                "needs_follow_up",
                name="call_outcome",
                native_enum=False,
                create_constraint=True,
                schema=SCHEMA,
            ),
            nullable=True,
        ),
        sa.Column(
            "follow_up_required", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("follow_up_notes", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["phone_call_id"],
            [f"{SCHEMA}.phone_calls.id"],
            name=op.f("fk_phone_call_batches_phone_call_id_phone_calls"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_phone_call_batches")),
        sa.UniqueConstraint(
            "phone_call_id",
            "placement_request_id",
            name=op.f("uq_phone_call_batches_phone_call_id_placement_request_id"),
        ),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_phone_call_batches_placement_request_id",
        "phone_call_batches",
        ["placement_request_id"],
        unique=False,
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_index(
        "ix_phone_call_batches_placement_request_id", table_name="phone_call_batches", schema=SCHEMA
    )
    op.drop_table("phone_call_batches", schema=SCHEMA)
    op.drop_index(
        "ix_phone_calls_therapist_id_scheduled_at", table_name="phone_calls", schema=SCHEMA
    )
    op.drop_index("ix_phone_calls_status_scheduled_at", table_name="phone_calls", schema=SCHEMA)
    op.drop_table("phone_calls", schema=SCHEMA)
    op.drop_index(
        "ix_email_batches_placement_request_id", table_name="email_batches", schema=SCHEMA
    )
    op.drop_table("email_batches", schema=SCHEMA)
    op.drop_table("therapists", schema=SCHEMA)
    op.drop_table("processed_messages", schema=SCHEMA)
    op.drop_index(
        "ix_placement_requests_therapist_status", table_name="placement_requests", schema=SCHEMA
    )
    op.drop_index(
        "ix_placement_requests_patient_id", table_name="placement_requests", schema=SCHEMA
    )
    op.drop_table("placement_requests", schema=SCHEMA)
    op.drop_table("patients", schema=SCHEMA)
    op.drop_index(
        "ix_outbox_unpublished",
        table_name="outbox",
        schema=SCHEMA,
        postgresql_where=sa.text("published_at IS NULL"),
        sqlite_where=sa.text("published_at IS NULL"),
    )
    op.drop_table("outbox", schema=SCHEMA)
    op.drop_index("ix_emails_therapist_id_status", table_name="emails", schema=SCHEMA)
    op.drop_index("ix_emails_status_next_attempt_at", table_name="emails", schema=SCHEMA)
    op.drop_table("emails", schema=SCHEMA)
    op.drop_index("ix_dead_letters_status_id", table_name="dead_letters", schema=SCHEMA)
    op.drop_table("dead_letters", schema=SCHEMA)
