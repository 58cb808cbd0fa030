"""the mailbox: inbound mail, reply tokens, bounces and undeliverable addresses

``inbound_mail`` keeps every message read from the service's mailbox, once (unique on
where the mailbox keeps it and on a hash of its bytes); ``mailbox_polls`` the last poll
of each mailbox. ``emails`` gains its reply token and its bounce; ``therapists`` the
address a permanent bounce flagged. Columns are added in place, never by copying a table
(on SQLite a copied ``emails`` would take its batch rows along, ON DELETE CASCADE).

Revision ID: f2a6c9d1b3e8
Revises: e5b8d2a4c7f1
Create Date: 2026-12-01 13:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "f2a6c9d1b3e8"
down_revision: str | None = "e5b8d2a4c7f1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = ("reply", "auto_reply", "bounce", "delayed", "unrelated")
STATES = ("matched", "unmatched", "ignored")


def _schema() -> str | None:
    # Alembic writes ALTER TABLE itself, past the schema translation: name no schema on SQLite.
    return None if op.get_bind().dialect.name == "sqlite" else SCHEMA


def _enum(name: str, values: Sequence[str]) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, schema=SCHEMA)


def upgrade() -> None:
    op.create_table(
        "inbound_mail",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("source", sa.String(length=300), nullable=False),
        sa.Column("source_key", sa.String(length=200), nullable=False),
        sa.Column("raw_sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", _enum("inbound_mail_kind", KINDS), nullable=False),
        sa.Column("state", _enum("inbound_mail_state", STATES), nullable=False),
        sa.Column("sender", sa.String(length=254), nullable=True),
        sa.Column("subject", sa.String(length=300), nullable=True),
        sa.Column("message_id", sa.String(length=300), nullable=True),
        sa.Column("email_id", sa.BigInteger(), nullable=True),
        sa.Column("match_method", sa.String(length=20), nullable=True),
        sa.Column("to_review", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("review_reason", sa.String(length=200), nullable=True),
        sa.Column("status_code", sa.String(length=16), nullable=True),
        sa.Column("diagnostic", sa.String(length=500), nullable=True),
        sa.Column("auto_reason", sa.String(length=200), nullable=True),
        sa.Column("defect", sa.String(length=200), nullable=True),
        sa.Column("reply_text", sa.Text(), nullable=True),
        sa.Column("raw", sa.LargeBinary(), nullable=True),
        sa.Column("redacted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("folder", sa.String(length=100), nullable=True),
        sa.Column("moved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["email_id"],
            [f"{SCHEMA}.emails.id"],
            name=op.f("fk_inbound_mail_email_id_emails"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbound_mail")),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_inbound_mail_source_key",
        "inbound_mail",
        ["source", "source_key"],
        unique=True,
        schema=SCHEMA,
    )
    op.create_index(
        "ix_inbound_mail_raw_sha256", "inbound_mail", ["raw_sha256"], unique=True, schema=SCHEMA
    )
    op.create_index("ix_inbound_mail_email_id", "inbound_mail", ["email_id"], schema=SCHEMA)
    op.create_index("ix_inbound_mail_state_kind", "inbound_mail", ["state", "kind"], schema=SCHEMA)
    op.create_index(
        "ix_inbound_mail_kept_fetched_at",
        "inbound_mail",
        ["fetched_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("redacted_at IS NULL"),
        sqlite_where=sa.text("redacted_at IS NULL"),
    )
    op.create_table(
        "mailbox_polls",
        sa.Column("source", sa.String(length=300), nullable=False),
        sa.Column("polled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fetched", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_mailbox_polls")),
        schema=SCHEMA,
    )
    for column in (
        sa.Column("reply_token", sa.String(length=40)),
        sa.Column("bounced_at", sa.DateTime(timezone=True)),
        sa.Column("bounce_permanent", sa.Boolean()),
        sa.Column("bounce_status", sa.String(length=16)),
        sa.Column("bounce_diagnostic", sa.String(length=500)),
    ):
        op.add_column("emails", column, schema=_schema())
    op.create_index("ix_emails_reply_token", "emails", ["reply_token"], unique=True, schema=SCHEMA)
    for column in (
        sa.Column("undeliverable_email", sa.String(length=254)),
        sa.Column("undeliverable_since", sa.DateTime(timezone=True)),
        sa.Column("undeliverable_status", sa.String(length=16)),
    ):
        op.add_column("therapists", column, schema=_schema())


def downgrade() -> None:
    # In place (SQLite 3.35+ drops a column natively), for the reason above.
    for name in ("undeliverable_status", "undeliverable_since", "undeliverable_email"):
        op.drop_column("therapists", name, schema=_schema())
    op.drop_index("ix_emails_reply_token", table_name="emails", schema=SCHEMA)
    for name in (
        "bounce_diagnostic",
        "bounce_status",
        "bounce_permanent",
        "bounced_at",
        "reply_token",
    ):
        op.drop_column("emails", name, schema=_schema())
    op.drop_table("mailbox_polls", schema=SCHEMA)
    op.drop_table("inbound_mail", schema=SCHEMA)
