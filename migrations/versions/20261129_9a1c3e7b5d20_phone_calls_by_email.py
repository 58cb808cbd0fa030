"""phone calls by email

Whether an email has a follow-up call is asked for every unanswered email; without this
index each question read the whole phone_calls table (found by ``make bench``).

Revision ID: 9a1c3e7b5d20
Revises: 64ffc140447f
Create Date: 2026-11-29 07:10:00.000000
"""

from collections.abc import Sequence

from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "9a1c3e7b5d20"
down_revision: str | None = "64ffc140447f"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_phone_calls_email_id", "phone_calls", ["email_id"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_index("ix_phone_calls_email_id", table_name="phone_calls", schema=SCHEMA)
