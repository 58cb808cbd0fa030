"""Whether a database may receive the demo: only if it holds nothing but the demo's own.

``comms demo`` writes fake therapists, requests and "sent" emails; pointed at production
by mistake it would mix them into real data (its therapists have ids 1 to 30, as real
ones may). The demo's messages have fixed event ids, so what the demo brought is known:
the messages the inbox applied with those ids, the therapists, patients and requests
they name, the demo's recorded past and whatever the service made for those therapists
(emails, calls). Anything else is someone else's data. Not used outside the demo.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, func, not_, or_, select
from sqlalchemy.orm import Session

from comms_tasks.models import (
    DeadLetter,
    Email,
    Patient,
    PhoneCall,
    PlacementRequest,
    ProcessedMessage,
    Therapist,
)
from comms_tasks.ops.demo import PLACEMENT_REQUEST_CREATED, THERAPIST_UPSERTED, DemoMessage
from comms_tasks.ops.demo_history import DEDUP_PREFIX


def _count(session: Session, model: type, condition: ColumnElement[bool]) -> int:
    return session.scalar(select(func.count()).select_from(model).where(condition)) or 0


def data_not_from_the_demo(session: Session, messages: Sequence[DemoMessage]) -> dict[str, int]:
    """Rows the demo did not bring, by what they are; empty when the demo may load.

    Read-only; a few counting queries, whatever the size of the database.
    """
    events = {message.kwargs["event"]["event_id"]: message.kwargs["event"] for message in messages}
    applied = [
        events[message_id]
        for message_id in session.scalars(
            select(ProcessedMessage.message_id).where(ProcessedMessage.message_id.in_(events))
        )
    ]
    therapists = {
        event["payload"]["therapist_id"]
        for event in applied
        if event["event_type"] == THERAPIST_UPSERTED
    }
    created = [
        event["payload"] for event in applied if event["event_type"] == PLACEMENT_REQUEST_CREATED
    ]
    requests = {payload["placement_request_id"] for payload in created}
    patients = {payload["patient_id"] for payload in created}
    demo_therapists = {
        event["payload"]["therapist_id"]
        for event in events.values()
        if event["event_type"] == THERAPIST_UPSERTED
    }
    found = {
        "applied messages": _count(
            session, ProcessedMessage, ProcessedMessage.message_id.not_in(events)
        ),
        "dead letters": _count(
            session,
            DeadLetter,
            or_(DeadLetter.message_id.is_(None), DeadLetter.message_id.not_in(events)),
        ),
        "therapists": _count(session, Therapist, Therapist.id.not_in(therapists)),
        "patients": _count(session, Patient, Patient.id.not_in(patients)),
        "placement requests": _count(
            session, PlacementRequest, PlacementRequest.id.not_in(requests)
        ),
        # The demo's past is recorded before its messages are applied.
        "emails": _count(
            session,
            Email,
            Email.therapist_id.not_in(therapists)
            & not_(
                func.coalesce(Email.dedup_key, "").startswith(DEDUP_PREFIX)
                & Email.therapist_id.in_(demo_therapists)
            ),
        ),
        "phone calls": _count(session, PhoneCall, PhoneCall.therapist_id.not_in(therapists)),
    }
    return {what: number for what, number in found.items() if number}


def describe(found: dict[str, int]) -> str:
    """``"12 therapists, 1 email"``: counts only, never values."""
    return ", ".join(
        f"{number} {what if number != 1 else what.removesuffix('s')}"
        for what, number in found.items()
    )
