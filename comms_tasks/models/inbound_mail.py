"""Mail that came back to the service's mailbox: replies, automatic answers, bounces."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from comms_tasks.contracts.limits import MAX_EMAIL
from comms_tasks.models.base import Base, BigID, UTCDateTime, utcnow, value_enum
from comms_tasks.models.enums import InboundMailKind, InboundMailState

# Bounds on what a stranger's message may put into a column.
MAX_MAIL_SUBJECT = 300
MAX_MAIL_MESSAGE_ID = 300
MAX_DIAGNOSTIC = 500
MAX_REASON = 200


class InboundMail(Base):
    """One message read from the mailbox, applied once.

    A message is known by where the mailbox keeps it (``source`` and ``source_key``:
    UIDVALIDITY and UID on IMAP, the file's key in a Maildir) and by a hash of its bytes;
    either seen again means a poll that crashed between its commit and the move: the
    message is moved, not applied twice. The raw bytes and the extracted reply are health
    data: redacted by retention and by ``patient.erased``.
    """

    __tablename__ = "inbound_mail"
    __table_args__ = (
        Index("ix_inbound_mail_source_key", "source", "source_key", unique=True),
        Index("ix_inbound_mail_raw_sha256", "raw_sha256", unique=True),
        Index("ix_inbound_mail_email_id", "email_id"),
        Index("ix_inbound_mail_state_kind", "state", "kind"),
        # Retention looks for messages whose bytes are still stored.
        Index(
            "ix_inbound_mail_kept_fetched_at",
            "fetched_at",
            postgresql_where=text("redacted_at IS NULL"),
            sqlite_where=text("redacted_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    source: Mapped[str] = mapped_column(String(300))
    source_key: Mapped[str] = mapped_column(String(200))
    raw_sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    fetched_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The message's own Date header, when it had a valid one; else when it was fetched.
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    kind: Mapped[InboundMailKind] = mapped_column(value_enum(InboundMailKind, "inbound_mail_kind"))
    state: Mapped[InboundMailState] = mapped_column(
        value_enum(InboundMailState, "inbound_mail_state")
    )
    # Header values from a stranger, bounded; shown to operators as written, escaped.
    sender: Mapped[str | None] = mapped_column(String(MAX_EMAIL).evaluates_none())
    subject: Mapped[str | None] = mapped_column(String(MAX_MAIL_SUBJECT).evaluates_none())
    message_id: Mapped[str | None] = mapped_column(String(MAX_MAIL_MESSAGE_ID).evaluates_none())
    email_id: Mapped[int | None] = mapped_column(
        BigInteger().evaluates_none(), ForeignKey("emails.id", ondelete="SET NULL")
    )
    # How it was matched: token, thread, sender or operator.
    match_method: Mapped[str | None] = mapped_column(String(20).evaluates_none())
    # Matched, but an operator should look (e.g. sent from another address).
    to_review: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    review_reason: Mapped[str | None] = mapped_column(String(MAX_REASON).evaluates_none())
    # Bounces: the enhanced status code and the server's diagnostic, one line.
    status_code: Mapped[str | None] = mapped_column(String(16).evaluates_none())
    diagnostic: Mapped[str | None] = mapped_column(String(MAX_DIAGNOSTIC).evaluates_none())
    # Automatic answers: which header made it one.
    auto_reason: Mapped[str | None] = mapped_column(String(MAX_REASON).evaluates_none())
    # Why a message could not be read (broken MIME, too large, ...): one line.
    defect: Mapped[str | None] = mapped_column(String(MAX_REASON).evaluates_none())
    # A human reply's new text, without the quoted original (health data).
    reply_text: Mapped[str | None] = mapped_column(Text().evaluates_none())
    raw: Mapped[bytes | None] = mapped_column(LargeBinary().evaluates_none())
    redacted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime().evaluates_none())
    # The mailbox folder it was moved to after its transaction committed.
    folder: Mapped[str | None] = mapped_column(String(100).evaluates_none())
    moved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime().evaluates_none())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    @classmethod
    def new(cls, **values: object) -> InboundMail:
        """A new row with every column given, None where ``values`` leaves it.

        The nullable columns send their None (``evaluates_none``): every new row then
        writes the same columns, and a poll's group goes in as one multi-row INSERT
        instead of one per pattern of empty columns.
        """
        return cls(**{**NEW_MAIL_DEFAULTS, **values})


class MailboxPoll(Base):
    """The last poll of each mailbox: when, and what it found (``comms status``)."""

    __tablename__ = "mailbox_polls"

    source: Mapped[str] = mapped_column(String(300), primary_key=True)
    polled_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    fetched: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(MAX_REASON))


# What a new row of ``inbound_mail`` holds until its message says otherwise.
NEW_MAIL_DEFAULTS: dict[str, object] = {
    **dict.fromkeys(
        (
            "sender",
            "subject",
            "message_id",
            "email_id",
            "match_method",
            "review_reason",
            "status_code",
            "diagnostic",
            "auto_reason",
            "defect",
            "reply_text",
            "raw",
            "redacted_at",
            "folder",
            "moved_at",
        )
    ),
    "to_review": False,
}
