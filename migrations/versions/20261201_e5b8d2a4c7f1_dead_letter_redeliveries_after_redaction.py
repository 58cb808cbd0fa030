"""dead letter redeliveries after redaction

A redelivery counted on a pending letter even when that letter was redacted (erasure,
retention), where it could never be replayed. The unique index of fingerprints now
covers pending letters that are not redacted, so such a delivery is a new letter.

Revision ID: e5b8d2a4c7f1
Revises: d7a3f1c9e2b4
Create Date: 2026-12-01 11:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comms_tasks.models.base import SCHEMA

revision: str = "e5b8d2a4c7f1"
down_revision: str | None = "d7a3f1c9e2b4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "uq_dead_letters_pending_fingerprint"
PENDING = "status = 'pending'"
PENDING_UNREDACTED = "status = 'pending' AND payload_redacted_at IS NULL"


def _index(where: str) -> None:
    op.create_index(
        INDEX,
        "dead_letters",
        ["task_name", "fingerprint"],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def upgrade() -> None:
    op.drop_index(INDEX, table_name="dead_letters", schema=SCHEMA)
    _index(PENDING_UNREDACTED)


def downgrade() -> None:
    # Two pending letters of one message (one redacted) cannot share the narrower index:
    # the redacted one keeps its row and loses its fingerprint, as letters stored before
    # fingerprints have none.
    schema = None if op.get_bind().dialect.name == "sqlite" else SCHEMA
    letters = sa.table(
        "dead_letters",
        sa.column("status"),
        sa.column("payload_redacted_at"),
        sa.column("fingerprint"),
        schema=schema,
    )
    op.execute(
        letters.update()
        .where(letters.c.status == "pending")
        .where(letters.c.payload_redacted_at.is_not(None))
        .values(fingerprint=None)
    )
    op.drop_index(INDEX, table_name="dead_letters", schema=SCHEMA)
    _index(PENDING)
