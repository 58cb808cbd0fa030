"""the time of the answer each request's outcome is from

``email_batches.response_received_at`` orders answers per request like ``occurred_at``
orders events: an older answer never overwrites a newer outcome. Existing outcomes start
from their email's ``response_date`` (the answer that wrote them last).

Revision ID: c3f1a8d2e6b4
Revises: c4d2e8a1f7b3
Create Date: 2026-12-01 10:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "c3f1a8d2e6b4"
down_revision: str | None = "c4d2e8a1f7b3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str | None:
    # Alembic writes ALTER TABLE itself, past the schema translation: name no schema on SQLite.
    return None if op.get_bind().dialect.name == "sqlite" else SCHEMA


def upgrade() -> None:
    with op.batch_alter_table("email_batches", schema=_schema()) as batch:
        batch.add_column(sa.Column("response_received_at", sa.DateTime(timezone=True)))
    batches = sa.table(
        "email_batches",
        sa.column("email_id"),
        sa.column("response_outcome"),
        sa.column("response_received_at"),
        schema=_schema(),
    )
    emails = sa.table("emails", sa.column("id"), sa.column("response_date"), schema=_schema())
    op.execute(
        batches.update()
        .where(batches.c.response_outcome.is_not(None))
        .values(
            response_received_at=sa.select(emails.c.response_date)
            .where(emails.c.id == batches.c.email_id)
            .scalar_subquery()
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("email_batches", schema=_schema()) as batch:
        batch.drop_column("response_received_at")
