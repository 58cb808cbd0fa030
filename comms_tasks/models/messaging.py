"""The outbox of published events, and the ledger of inbound messages."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from comms_tasks.models.base import Base, BigID, JSONDocument, UTCDateTime, utcnow, value_enum
from comms_tasks.models.enums import DeadLetterStatus


class OutboxEvent(Base):
    """An event written in the transaction of its change; relayed later, at least once."""

    __tablename__ = "outbox"
    __table_args__ = (
        # Only unpublished rows are looked up by the relay.
        Index(
            "ix_outbox_unpublished",
            "id",
            postgresql_where=text("published_at IS NULL"),
            sqlite_where=text("published_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    event_type: Mapped[str] = mapped_column(String(100))
    # The whole envelope, exactly as it will be published.
    envelope: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)


class ProcessedMessage(Base):
    """An inbound event or command already applied: its id is never applied again."""

    __tablename__ = "processed_messages"

    message_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(100))
    processed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


# The partial index's predicate, and ON CONFLICT's, which must be the same text.
PENDING = "status = 'pending'"
# The letters a redelivery counts on: pending and not redacted. A redacted letter can
# never be replayed, so a delivery after its redaction is a new letter.
PENDING_UNREDACTED = "status = 'pending' AND payload_redacted_at IS NULL"


class DeadLetter(Base):
    """An inbound message that failed validation, kept whole so it can be replayed.

    Its health data goes with the patient's erasure and after the retention period
    (``comms_tasks.inbound.dead_letters``).
    """

    __tablename__ = "dead_letters"
    __table_args__ = (
        Index("ix_dead_letters_status_id", "status", "id"),
        # One pending, unredacted letter per message: a redelivery counts on the letter
        # it repeats.
        Index(
            "uq_dead_letters_pending_fingerprint",
            "task_name",
            "fingerprint",
            unique=True,
            postgresql_where=text(PENDING_UNREDACTED),
            sqlite_where=text(PENDING_UNREDACTED),
        ),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    task_name: Mapped[str] = mapped_column(String(100))
    # The event_id or command_id when the message had a readable one.
    message_id: Mapped[str | None] = mapped_column(String(200))
    # One line naming the field; never a value of the message.
    reason: Mapped[str] = mapped_column(Text)
    # The message as received. May hold patient data: shown only on request.
    payload: Mapped[Any] = mapped_column(JSONDocument)
    status: Mapped[DeadLetterStatus] = mapped_column(
        value_enum(DeadLetterStatus, "dead_letter_status")
    )
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    replay_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    replayed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Set when the payload's health data was removed (patient erased, retention): the
    # ids stay, the message can no longer be replayed.
    payload_redacted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # SHA-256 (hex) of the stored message as canonical JSON; None on letters stored before.
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    # How often the message arrived (and failed) while this letter was pending.
    deliveries: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))


class TaskRun(Base):
    """When each scheduled task last finished, for ``comms status``."""

    __tablename__ = "task_runs"

    task_name: Mapped[str] = mapped_column(String(100), primary_key=True)
    last_finished_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_state: Mapped[str] = mapped_column(String(20))
    runs: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))


class TaskDelivery(Base):
    """A task message that started running and has not finished (``comms_tasks.worker.deliveries``).

    One row per message and attempt (``retries``): written, committed, before the task's
    body runs, removed when it returns or raises. A row still there when the message
    arrives again means the process running it died.
    """

    __tablename__ = "task_deliveries"

    task_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    retries: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_name: Mapped[str] = mapped_column(String(100))
    deliveries: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    last_delivered_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
