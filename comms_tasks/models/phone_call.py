"""Follow-up phone calls made by the placement team, and the requests each discusses."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Time,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from comms_tasks.models.base import Base, BigID, UTCDateTime, track_activity, utcnow, value_enum
from comms_tasks.models.enums import PhoneCallStatus, ResponseOutcome


class PhoneCall(Base):
    __tablename__ = "phone_calls"
    __table_args__ = (
        Index("ix_phone_calls_status_scheduled_at", "status", "scheduled_at"),
        Index("ix_phone_calls_therapist_id_scheduled_at", "therapist_id", "scheduled_at"),
        Index("ix_phone_calls_email_id", "email_id"),
        # Retention looks for free text still stored, by the call's last activity.
        Index(
            "ix_phone_calls_last_activity_at",
            "last_activity_at",
            postgresql_where=text("text_redacted_at IS NULL"),
            sqlite_where=text("text_redacted_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    therapist_id: Mapped[int] = mapped_column(BigInteger)
    # The unanswered email this call follows up, if any.
    email_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("emails.id", ondelete="SET NULL")
    )
    # The failed call this one retries, if any; attempt counts from 1.
    previous_call_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("phone_calls.id", ondelete="SET NULL")
    )
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    # One follow-up call per email, one retry per failed call, one call per command.
    dedup_key: Mapped[str] = mapped_column(String(200), unique=True)
    # Local wall time in the business time zone, as operators read it...
    scheduled_date: Mapped[dt.date] = mapped_column(Date)
    scheduled_time: Mapped[dt.time] = mapped_column(Time)
    # ...and the same instant in UTC, which orders and compares calls.
    scheduled_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    duration_minutes: Mapped[int] = mapped_column(Integer, default=5, server_default=text("5"))
    actual_date: Mapped[dt.date | None] = mapped_column(Date)
    actual_time: Mapped[dt.time | None] = mapped_column(Time)
    status: Mapped[PhoneCallStatus] = mapped_column(
        value_enum(PhoneCallStatus, "phone_call_status")
    )
    outcome: Mapped[str | None] = mapped_column(Text)
    notes: Mapped[str | None] = mapped_column(Text)
    retry_after: Mapped[dt.date | None] = mapped_column(Date)
    follow_up_required: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )
    follow_up_notes: Mapped[str | None] = mapped_column(Text)
    # The retention clock, as for emails: when something last happened to the
    # call itself (booked, moved, its outcome, cancelled; see CALL_ACTIVITY_FIELDS).
    last_activity_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When its free text (notes, outcome, the notes per request) was removed, by erasure
    # or retention; text recorded later is not kept.
    text_redacted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    batches: Mapped[list[PhoneCallBatch]] = relationship(
        back_populates="phone_call",
        order_by="PhoneCallBatch.priority",
        cascade="all, delete-orphan",
    )


# A change to one of these is activity and moves ``last_activity_at``; a redaction is not.
CALL_ACTIVITY_FIELDS = ("status", "scheduled_at", "actual_date", "actual_time")


track_activity(PhoneCall, CALL_ACTIVITY_FIELDS)


class PhoneCallBatch(Base):
    """One placement request to discuss in one call."""

    __tablename__ = "phone_call_batches"
    __table_args__ = (
        UniqueConstraint("phone_call_id", "placement_request_id"),
        Index("ix_phone_call_batches_placement_request_id", "placement_request_id"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    phone_call_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("phone_calls.id", ondelete="CASCADE")
    )
    placement_request_id: Mapped[int] = mapped_column(BigInteger)
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    discussed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    outcome: Mapped[ResponseOutcome | None] = mapped_column(
        value_enum(ResponseOutcome, "call_outcome")
    )
    follow_up_required: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )
    follow_up_notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    phone_call: Mapped[PhoneCall] = relationship(back_populates="batches")
