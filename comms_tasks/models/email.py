"""Emails to therapists and the placement requests each one asks about."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from comms_tasks.contracts.limits import MAX_DISPLAY_NAME, MAX_EMAIL, MAX_NAME, MAX_SUBJECT
from comms_tasks.models.base import Base, BigID, UTCDateTime, track_activity, utcnow, value_enum
from comms_tasks.models.enums import EmailStatus, EmailTemplate, ResponseOutcome

FOLLOW_UP_DUE = (
    "template IN ('initial_contact', 'batch_request') AND status = 'sent'"
    " AND response_received IS false AND follow_up_required IS false"
    " AND call_requested_at IS NULL AND follow_up_settled_at IS NULL"
)


class Email(Base):
    __tablename__ = "emails"
    __table_args__ = (
        # The send loop looks for due queued emails and for expired "sending" leases.
        Index("ix_emails_status_next_attempt_at", "status", "next_attempt_at"),
        # The claim takes queued emails in this order, the first hundred: read from here
        # it stops at them, where the index above left every due email to sort.
        Index(
            "ix_emails_queued_next_attempt_at",
            "next_attempt_at",
            "id",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        Index("ix_emails_therapist_id_status", "therapist_id", "status"),
        Index("ix_emails_reply_token", "reply_token", unique=True),
        # The follow-up queue: only emails waiting for a call are indexed.
        Index(
            "ix_emails_call_requested_at",
            "call_requested_at",
            postgresql_where=text("call_requested_at IS NOT NULL"),
            sqlite_where=text("call_requested_at IS NOT NULL"),
        ),
        # The follow-up check's candidates: sent asking emails not yet answered, marked or
        # settled. Only the last days' emails are in it, however many were ever sent. The
        # condition is the check's own (calls.request_follow_up_calls), so that it implies it.
        Index(
            "ix_emails_follow_up_due",
            "sent_at",
            postgresql_where=text(FOLLOW_UP_DUE),
            sqlite_where=text(FOLLOW_UP_DUE),
        ),
        # An answer cancels the reminders of its email (and a reminder's answer, those of
        # its original): found by the email they follow up, not by reading every email.
        Index(
            "ix_emails_in_reply_to_email_id",
            "in_reply_to_email_id",
            postgresql_where=text("in_reply_to_email_id IS NOT NULL"),
            sqlite_where=text("in_reply_to_email_id IS NOT NULL"),
        ),
        # Retention looks for bodies still stored, by their last activity.
        Index(
            "ix_emails_last_activity_at",
            "last_activity_at",
            postgresql_where=text("body_redacted_at IS NULL"),
            sqlite_where=text("body_redacted_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    therapist_id: Mapped[int] = mapped_column(BigInteger)
    template: Mapped[EmailTemplate] = mapped_column(value_enum(EmailTemplate, "email_template"))
    # Makes "never twice" a database fact: e.g. one batch email per therapist and run day,
    # one reminder per original email, one confirmation per accepted request.
    dedup_key: Mapped[str] = mapped_column(String(200), unique=True)
    recipient_email: Mapped[str] = mapped_column(String(MAX_EMAIL))
    recipient_name: Mapped[str] = mapped_column(String(MAX_DISPLAY_NAME))
    sender_email: Mapped[str] = mapped_column(String(MAX_EMAIL))
    sender_name: Mapped[str] = mapped_column(String(MAX_NAME))
    reply_to: Mapped[str | None] = mapped_column(String(MAX_EMAIL))
    subject: Mapped[str] = mapped_column(String(MAX_SUBJECT))
    body_html: Mapped[str] = mapped_column(Text)
    body_text: Mapped[str] = mapped_column(Text)
    # Fixed when the email is queued, the same on every attempt.
    message_id: Mapped[str] = mapped_column(String(300), unique=True)
    # The email's own token in its reply and bounce addresses (``antwort+<token>@...``):
    # random, so that a reply finds its email and nobody can guess another's.
    reply_token: Mapped[str | None] = mapped_column(String(40))
    in_reply_to_email_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("emails.id", ondelete="SET NULL")
    )
    status: Mapped[EmailStatus] = mapped_column(value_enum(EmailStatus, "email_status"))
    queued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # While "sending": until when the claiming worker holds it.
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    error_message: Mapped[str | None] = mapped_column(Text)
    retry_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    response_received: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )
    response_date: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    response_content: Mapped[str | None] = mapped_column(Text)
    # Reminders of this email queued until then are void: an answer known by then covers
    # them (answers.cancel_unsent_reminders; the claim cancels one given back unsent).
    reminders_void_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    follow_up_required: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )
    follow_up_notes: Mapped[str | None] = mapped_column(Text)
    # A bounce: when, permanent or not, its status code (RFC 3463) and diagnostic. A
    # permanent bounce makes the email undeliverable; a later one upgrades a temporary one.
    bounced_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    bounce_permanent: Mapped[bool | None] = mapped_column(Boolean)
    bounce_status: Mapped[str | None] = mapped_column(String(16))
    bounce_diagnostic: Mapped[str | None] = mapped_column(String(500))
    # Set by the follow-up check when the email went unanswered: it waits for a call.
    call_requested_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Set by the follow-up check when no request of the email was left to discuss: the
    # email gets no call, and the check never takes it up again.
    follow_up_settled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # The retention clock: when something last happened to the email itself
    # (queued, an attempt, sent, failed, cancelled, answered; see ACTIVITY_FIELDS).
    # Housekeeping writes (the follow-up check's marks and flags) leave it alone, unlike
    # ``updated_at``.
    last_activity_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    body_redacted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    batches: Mapped[list[EmailBatch]] = relationship(
        back_populates="email", order_by="EmailBatch.priority", cascade="all, delete-orphan"
    )


# A change to one of these is activity and moves ``last_activity_at``. A field left out
# errs on the side of privacy: a body is kept no longer because of it.
ACTIVITY_FIELDS = ("status", "sent_at", "response_received", "response_date")


track_activity(Email, ACTIVITY_FIELDS)


class EmailBatch(Base):
    """One placement request asked about in one email."""

    __tablename__ = "email_batches"
    __table_args__ = (
        UniqueConstraint("email_id", "placement_request_id"),
        UniqueConstraint("email_id", "priority"),
        Index("ix_email_batches_placement_request_id", "placement_request_id"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    email_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("emails.id", ondelete="CASCADE"))
    placement_request_id: Mapped[int] = mapped_column(BigInteger)
    # 1 = asked about first.
    priority: Mapped[int] = mapped_column(Integer)
    # False once the request was withdrawn before the email went out.
    included: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    response_outcome: Mapped[ResponseOutcome | None] = mapped_column(
        value_enum(ResponseOutcome, "response_outcome")
    )
    response_notes: Mapped[str | None] = mapped_column(Text)
    # The ``received_at`` of the answer the outcome is from: an older answer never
    # overwrites it (answers are ordered like events).
    response_received_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    email: Mapped[Email] = relationship(back_populates="batches")
