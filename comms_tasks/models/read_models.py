"""Local copies of other services' data, filled only from their messages.

Each row remembers the ``occurred_at`` of the last event applied to it, so an older
event arriving late never overwrites a newer state.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import BigInteger, Boolean, Date, Index, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from comms_tasks.contracts.limits import MAX_EMAIL, MAX_NAME, MAX_SALUTATION
from comms_tasks.models.base import Base, JSONDocument, UTCDateTime, utcnow, value_enum
from comms_tasks.models.enums import PlacementRequestStatus, TherapistStatus


class Therapist(Base):
    __tablename__ = "therapists"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    salutation: Mapped[str | None] = mapped_column(String(MAX_SALUTATION))
    title: Mapped[str | None] = mapped_column(String(MAX_NAME))
    first_name: Mapped[str] = mapped_column(String(MAX_NAME))
    last_name: Mapped[str] = mapped_column(String(MAX_NAME))
    email: Mapped[str | None] = mapped_column(String(MAX_EMAIL))
    phone: Mapped[str | None] = mapped_column(String(MAX_NAME))
    # Weekday -> list of {"start": "HH:MM", "end": "HH:MM"}, validated and merged.
    phone_availability: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    status: Mapped[TherapistStatus] = mapped_column(value_enum(TherapistStatus, "therapist_status"))
    # A permanent bounce flags the address it bounced from: no email goes to it while it
    # is the therapist's address; a new address from the therapist service lifts it.
    undeliverable_email: Mapped[str | None] = mapped_column(String(MAX_EMAIL))
    undeliverable_since: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    undeliverable_status: Mapped[str | None] = mapped_column(String(16))
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_event_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    @property
    def display_name(self) -> str:
        return full_name(self.title, self.first_name, self.last_name)


def full_name(title: str | None, first_name: str | None, last_name: str | None) -> str:
    """ "Dr. Anna Wagner": the parts there are, in this order."""
    return " ".join(part for part in (title, first_name, last_name) if part)


# The patient summary's fields, as matching sends them and the templates show them.
SUMMARY_FIELDS = (
    "registered_on",
    "diagnosis",
    "gender",
    "time_availability",
    "symptoms_since",
    "open_to_group_therapy",
    "therapy_experience",
    "current_complaints",
)


class Patient(Base):
    """The patient summary a therapist sees; health data."""

    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    registered_on: Mapped[dt.date | None] = mapped_column(Date)
    diagnosis: Mapped[str | None] = mapped_column(Text)
    gender: Mapped[str | None] = mapped_column(Text)
    time_availability: Mapped[str | None] = mapped_column(Text)
    symptoms_since: Mapped[str | None] = mapped_column(Text)
    open_to_group_therapy: Mapped[bool | None] = mapped_column(Boolean)
    therapy_experience: Mapped[str | None] = mapped_column(Text)
    current_complaints: Mapped[str | None] = mapped_column(Text)
    summary_event_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    erased_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class PlacementRequest(Base):
    __tablename__ = "placement_requests"
    __table_args__ = (
        Index("ix_placement_requests_therapist_status", "therapist_id", "status"),
        Index("ix_placement_requests_patient_id", "patient_id"),
        # Retention looks for status reasons still stored, by the request's last event.
        Index(
            "ix_placement_requests_status_reason_kept",
            "last_event_at",
            postgresql_where=text("status_reason IS NOT NULL"),
            sqlite_where=text("status_reason IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    # No foreign keys to the other read models: their events may arrive in any order.
    patient_id: Mapped[int] = mapped_column(BigInteger)
    therapist_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[PlacementRequestStatus] = mapped_column(
        value_enum(PlacementRequestStatus, "placement_request_status")
    )
    status_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_event_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
