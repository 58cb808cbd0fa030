"""subject back to 300

A confirmation's subject names at most four request ids now (then "und N weitere"), so
the longest subject a template makes is 129 characters; the column widened to 2300 for
subjects listing 100 ids goes back to 300. A longer subject stored meanwhile (only such
a confirmation, or a follow-up to one) is cut to 299 characters and an ellipsis first,
so that narrowing cannot fail.

Revision ID: e5b9a0c6d413
Revises: d81f0c3a5e27
Create Date: 2026-12-01 10:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "e5b9a0c6d413"
down_revision: str | None = "d81f0c3a5e27"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out, not read from the models, so that this migration stays what it was.
WIDE = 2300
NARROW = 300


def _schema() -> str | None:
    # SQLite has no schemas; its batch mode copies the table, and the copy's rename must
    # not name one.
    return None if op.get_context().dialect.name == "sqlite" else SCHEMA


def _alter(before: int, after: int) -> None:
    with op.batch_alter_table("emails", schema=_schema()) as batch:
        batch.alter_column(
            "subject",
            existing_type=sa.String(length=before),
            type_=sa.String(length=after),
            existing_nullable=False,
        )


def upgrade() -> None:
    emails = sa.table("emails", sa.column("subject", sa.String()), schema=_schema())
    op.execute(
        emails.update()
        .where(sa.func.length(emails.c.subject) > NARROW)
        .values(
            subject=sa.func.substr(emails.c.subject, 1, NARROW - 1, type_=sa.String()) + "\u2026"
        )
    )
    _alter(WIDE, NARROW)


def downgrade() -> None:
    _alter(NARROW, WIDE)
