"""Factories for inbound messages (as other services send them) and for rows."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import Engine, insert
from sqlalchemy.orm import Session

from comms_tasks.mail.message import new_message_id
from comms_tasks.models import Email, EmailStatus, EmailTemplate, Therapist, TherapistStatus

BASE_TIME = dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.UTC)


def at(minutes: int) -> dt.datetime:
    return BASE_TIME + dt.timedelta(minutes=minutes)


def envelope(
    event_type: str,
    payload: dict[str, Any],
    *,
    occurred_at: dt.datetime = BASE_TIME,
    event_id: str | None = None,
    producer: str = "test-service",
) -> dict[str, Any]:
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "event_type": event_type,
        "version": 1,
        "occurred_at": occurred_at.isoformat(),
        "producer": producer,
        "payload": payload,
    }


def therapist_payload(therapist_id: int = 1, **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "therapist_id": therapist_id,
        "salutation": "Frau",
        "title": "Dr.",
        "first_name": "Anna",
        "last_name": "Weber",
        "email": f"praxis{therapist_id}@weber-therapie.de",
        "phone": "+49 30 1234567",
        "phone_availability": {"monday": [{"start": "09:00", "end": "10:00"}]},
        "status": "active",
    }
    payload.update(overrides)
    return payload


def therapist_upserted(
    therapist_id: int = 1,
    *,
    occurred_at: dt.datetime = BASE_TIME,
    event_id: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    return envelope(
        "therapist.upserted",
        therapist_payload(therapist_id, **overrides),
        occurred_at=occurred_at,
        event_id=event_id,
    )


def therapist_deleted(
    therapist_id: int = 1, *, occurred_at: dt.datetime = BASE_TIME
) -> dict[str, Any]:
    return envelope("therapist.deleted", {"therapist_id": therapist_id}, occurred_at=occurred_at)


def patient_summary(**overrides: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "registered_on": "2026-09-14",
        "diagnosis": "F32.1 Mittelgradige depressive Episode",
        "gender": "weiblich",
        "time_availability": "Montags und mittwochs ab 16 Uhr",
        "symptoms_since": "seit etwa 8 Monaten",
        "open_to_group_therapy": True,
        "therapy_experience": "Keine Vorerfahrung",
        "current_complaints": "Antriebslosigkeit und Schlafstörungen.",
    }
    summary.update(overrides)
    return summary


def request_created(
    request_id: int = 1,
    *,
    patient_id: int = 100,
    therapist_id: int = 1,
    created_at: dt.datetime = BASE_TIME,
    occurred_at: dt.datetime = BASE_TIME,
    event_id: str | None = None,
    **summary: Any,
) -> dict[str, Any]:
    return envelope(
        "placement_request.created",
        {
            "placement_request_id": request_id,
            "patient_id": patient_id,
            "therapist_id": therapist_id,
            "created_at": created_at.isoformat(),
            "patient": patient_summary(**summary),
        },
        occurred_at=occurred_at,
        event_id=event_id,
    )


def status_changed(
    request_id: int,
    new_status: str,
    *,
    old_status: str = "open",
    occurred_at: dt.datetime = BASE_TIME,
    reason: str | None = None,
) -> dict[str, Any]:
    return envelope(
        "placement_request.status_changed",
        {
            "placement_request_id": request_id,
            "old_status": old_status,
            "new_status": new_status,
            "reason": reason,
        },
        occurred_at=occurred_at,
    )


def request_cancelled(request_id: int, *, occurred_at: dt.datetime = BASE_TIME) -> dict[str, Any]:
    return envelope(
        "placement_request.cancelled",
        {"placement_request_id": request_id, "reason": "Patient hat anderweitig Platz gefunden"},
        occurred_at=occurred_at,
    )


def patient_updated(
    patient_id: int = 100, *, occurred_at: dt.datetime = BASE_TIME, **summary: Any
) -> dict[str, Any]:
    return envelope(
        "patient.updated",
        {"patient_id": patient_id, "patient": patient_summary(**summary)},
        occurred_at=occurred_at,
    )


def patient_erased(
    patient_id: int = 100, *, occurred_at: dt.datetime = BASE_TIME
) -> dict[str, Any]:
    return envelope("patient.erased", {"patient_id": patient_id}, occurred_at=occurred_at)


def make_therapist(session: Session, therapist_id: int = 1, **overrides: Any) -> Therapist:
    values: dict[str, Any] = {
        "id": therapist_id,
        "salutation": "Frau",
        "title": "Dr.",
        "first_name": "Anna",
        "last_name": "Weber",
        "email": f"praxis{therapist_id}@weber-therapie.de",
        "phone": "+49 30 1234567",
        "phone_availability": {"monday": [{"start": "09:00", "end": "10:00"}]},
        "status": TherapistStatus.ACTIVE,
        "last_event_at": BASE_TIME,
    }
    values.update(overrides)
    therapist = Therapist(**values)
    session.add(therapist)
    session.flush()
    return therapist


def plain_therapist_rows(addresses: dict[int, str]) -> list[dict[str, Any]]:
    """Active therapists "Praxis <number>" at these addresses, as rows to insert.

    Sending checks an email's therapist again, so a plain email needs one.
    """
    return [
        {
            "id": number,
            "first_name": "Praxis",
            "last_name": str(number),
            "email": address,
            "status": TherapistStatus.ACTIVE,
            "last_event_at": BASE_TIME,
        }
        for number, address in addresses.items()
    ]


def plain_body(number: int) -> str:
    """A body with the greeting sending expects for "Praxis <number>"."""
    return f"Guten Tag Praxis {number},"


def queue_plain_emails(engine: Engine, count: int, prefix: str) -> list[str]:
    """``count`` queued, due emails to distinct therapists, inserted in two statements.

    For tests that are about sending, not about what is sent. Returns the Message-IDs.
    """
    now = dt.datetime.now(dt.UTC)
    addresses = {number: f"praxis{number}@example.org" for number in range(1, count + 1)}
    sender = "anfragen@therapievermittlung.example"
    rows = [
        {
            "therapist_id": number,
            "template": EmailTemplate.INITIAL_CONTACT,
            "dedup_key": f"{prefix}:{number}",
            "recipient_email": addresses[number],
            "recipient_name": f"Praxis {number}",
            "sender_email": sender,
            "sender_name": "Therapievermittlung",
            "subject": "Anfrage für einen Therapieplatz",
            "body_html": f"<p>{plain_body(number)}</p>",
            "body_text": plain_body(number),
            "message_id": new_message_id(sender),
            "status": EmailStatus.QUEUED,
            "queued_at": now,
            "next_attempt_at": now,
        }
        for number in range(1, count + 1)
    ]
    with Session(engine) as session, session.begin():
        session.execute(insert(Therapist), plain_therapist_rows(addresses))
        session.execute(insert(Email), rows)
    return [str(row["message_id"]) for row in rows]
