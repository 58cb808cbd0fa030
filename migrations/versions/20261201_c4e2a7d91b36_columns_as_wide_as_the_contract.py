"""columns as wide as the contract

A title or phone number may be as long as a name (200), the recipient name as long as
the longest display name (salutation, title, first and last name: 623).
Before, a 56-character title was a DataError on PostgreSQL.

Revision ID: c4e2a7d91b36
Revises: 5e7d2c41a9b3
Create Date: 2026-12-01 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "c4e2a7d91b36"
down_revision: str | None = "5e7d2c41a9b3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, column, length before, length after); written out, not read from the models,
# so that this migration stays what it was when the models change again.
WIDENED = (
    ("therapists", "title", 50, 200),
    ("therapists", "phone", 50, 200),
    ("emails", "recipient_name", 300, 623),
)


def _alter(to_new: bool) -> None:
    # SQLite has no schemas; its batch mode copies the table, and the copy's rename must
    # not name one.
    schema = None if op.get_context().dialect.name == "sqlite" else SCHEMA
    for table in ("therapists", "emails"):
        with op.batch_alter_table(table, schema=schema) as batch:
            for name, column, before, after in WIDENED:
                if name != table:
                    continue
                old, new = (before, after) if to_new else (after, before)
                batch.alter_column(
                    column,
                    existing_type=sa.String(length=old),
                    type_=sa.String(length=new),
                    existing_nullable=column in ("title", "phone"),
                )


def upgrade() -> None:
    _alter(to_new=True)


def downgrade() -> None:
    # Narrowing fails on PostgreSQL if a longer value is stored: that is deliberate,
    # a downgrade must not cut names.
    _alter(to_new=False)
