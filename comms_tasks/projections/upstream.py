"""Apply other services' events to the local read models.

Each function takes the session and a validated event and never commits. An event older
than the state it would change (by ``occurred_at``, per entity) changes nothing.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from comms_tasks.calls import outcomes
from comms_tasks.contracts import Rejected, received
from comms_tasks.contracts.common import availability_to_json
from comms_tasks.inbound.dead_letters import erase_patient_from_dead_letters
from comms_tasks.mailbox.redaction import erase_patient_from_mail, wait_for_recording
from comms_tasks.models import (
    Patient,
    PlacementRequest,
    PlacementRequestStatus,
    Therapist,
    TherapistStatus,
)
from comms_tasks.models.read_models import SUMMARY_FIELDS
from comms_tasks.privacy.retention import erase_patient_from_calls, erase_patient_from_emails
from comms_tasks.settings import get_settings


def _is_stale(last_applied: dt.datetime | None, occurred_at: dt.datetime) -> bool:
    # Equal times apply (the later delivery wins); only strictly older events are dropped.
    return last_applied is not None and occurred_at < last_applied


# --- therapists ------------------------------------------------------------------


def apply_therapist_event(session: Session, event: received.Envelope) -> None:
    if isinstance(event, received.TherapistUpserted):
        upsert_therapist(session, event)
    elif isinstance(event, received.TherapistDeleted):
        delete_therapist(session, event)
    else:
        raise TypeError(type(event).__name__)


def upsert_therapist(session: Session, event: received.TherapistUpserted) -> None:
    data = event.payload
    therapist = session.get(Therapist, data.therapist_id, with_for_update=True)
    if therapist is not None and _is_stale(therapist.last_event_at, event.occurred_at):
        return
    if therapist is None:
        therapist = Therapist(id=data.therapist_id)
        session.add(therapist)
    therapist.salutation = data.salutation
    therapist.title = data.title
    therapist.first_name = data.first_name
    therapist.last_name = data.last_name
    therapist.email = data.email
    therapist.phone = data.phone
    therapist.phone_availability = availability_to_json(data.phone_availability)
    therapist.status = TherapistStatus(data.status)
    therapist.deleted_at = None
    therapist.last_event_at = event.occurred_at


def delete_therapist(session: Session, event: received.TherapistDeleted) -> None:
    therapist = session.get(Therapist, event.payload.therapist_id, with_for_update=True)
    if therapist is not None and _is_stale(therapist.last_event_at, event.occurred_at):
        return
    if therapist is None:
        # A tombstone, so that an older "upserted" arriving late cannot bring it back.
        therapist = Therapist(
            id=event.payload.therapist_id,
            first_name="",
            last_name="",
            status=TherapistStatus.INACTIVE,
        )
        session.add(therapist)
    therapist.deleted_at = event.occurred_at
    therapist.last_event_at = event.occurred_at


# --- patients ----------------------------------------------------------------------


def _apply_summary(
    session: Session,
    patient_id: int,
    summary: received.PatientSummary,
    occurred_at: dt.datetime,
) -> None:
    patient = session.get(Patient, patient_id, with_for_update=True)
    if patient is not None and (
        patient.erased_at is not None or _is_stale(patient.summary_event_at, occurred_at)
    ):
        # Erasure is final: no later summary brings the data back.
        return
    if patient is None:
        patient = Patient(id=patient_id)
        session.add(patient)
    for field in SUMMARY_FIELDS:
        setattr(patient, field, getattr(summary, field))
    patient.summary_event_at = occurred_at


def apply_patient_event(session: Session, event: received.Envelope) -> None:
    if isinstance(event, received.PatientUpdated):
        _apply_summary(session, event.payload.patient_id, event.payload.patient, event.occurred_at)
    elif isinstance(event, received.PatientErased):
        # Before any row lock: a poll recording mail finishes first (see redaction).
        wait_for_recording(session)
        erase_patient(session, event.payload.patient_id, event.occurred_at)
        erase_patient_from_emails(
            session, event.payload.patient_id, event.occurred_at, get_settings()
        )
        erase_patient_from_mail(session, event.payload.patient_id, event.occurred_at)
        erase_patient_from_dead_letters(session, event.payload.patient_id, event.occurred_at)
        erase_patient_from_calls(session, event.payload.patient_id, event.occurred_at)
    else:
        raise TypeError(type(event).__name__)


def erase_patient(session: Session, patient_id: int, occurred_at: dt.datetime) -> None:
    """Remove the patient's summary from the read model, for good."""
    patient = session.get(Patient, patient_id, with_for_update=True)
    if patient is None:
        patient = Patient(id=patient_id, summary_event_at=occurred_at)
        session.add(patient)
    for field in SUMMARY_FIELDS:
        setattr(patient, field, None)
    if patient.erased_at is None:
        patient.erased_at = occurred_at


# --- placement requests ------------------------------------------------------------


def apply_matching_event(session: Session, event: received.Envelope) -> None:
    if isinstance(event, received.PlacementRequestCreated):
        create_placement_request(session, event)
    elif isinstance(event, received.PlacementRequestStatusChanged):
        data = event.payload
        change_request_status(
            session, data.placement_request_id, data.new_status, data.reason, event.occurred_at
        )
    elif isinstance(event, received.PlacementRequestCancelled):
        cancelled = event.payload
        change_request_status(
            session,
            cancelled.placement_request_id,
            "cancelled",
            cancelled.reason,
            event.occurred_at,
        )
    else:
        raise TypeError(type(event).__name__)


def create_placement_request(session: Session, event: received.PlacementRequestCreated) -> None:
    data = event.payload
    _apply_summary(session, data.patient_id, data.patient, event.occurred_at)
    request = session.get(PlacementRequest, data.placement_request_id, with_for_update=True)
    if request is not None:
        if _is_stale(request.last_event_at, event.occurred_at):
            return
        if (request.patient_id, request.therapist_id) != (data.patient_id, data.therapist_id):
            raise Rejected(
                "event.payload.placement_request_id: already exists for another patient "
                "or therapist",
                str(event.event_id),
            )
        # A re-sent "created" does not reopen a request that has moved on, and it moves
        # no clock: ``last_event_at`` orders status changes, and it changes no status.
        request.created_at = data.created_at
        return
    session.add(
        PlacementRequest(
            id=data.placement_request_id,
            patient_id=data.patient_id,
            therapist_id=data.therapist_id,
            status=PlacementRequestStatus.OPEN,
            created_at=data.created_at,
            # "open" holds from the creation: a re-published "created" (a later envelope)
            # seen first must not hide a status change made after the creation.
            last_event_at=min(event.occurred_at, data.created_at),
        )
    )


def change_request_status(
    session: Session,
    placement_request_id: int,
    new_status: str,
    reason: str | None,
    occurred_at: dt.datetime,
) -> None:
    request = session.get(PlacementRequest, placement_request_id, with_for_update=True)
    if request is None:
        # Kept as a dead letter: replayed once the "created" event has arrived.
        raise Rejected("event.payload.placement_request_id: unknown placement request", None)
    if _is_stale(request.last_event_at, occurred_at):
        return
    request.status = PlacementRequestStatus(new_status)
    request.status_reason = reason
    request.last_event_at = occurred_at
    if not request.status.is_pending:
        # Unsent emails drop it when they are sent; a call about nothing is cancelled now.
        outcomes.withdraw_request_from_calls(session, request.id)
