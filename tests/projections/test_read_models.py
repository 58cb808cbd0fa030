"""Applying other services' events to the read models: once, in order, never backwards."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from comms_tasks.contracts import Rejected, validate_event
from comms_tasks.models import (
    Patient,
    PlacementRequest,
    PlacementRequestStatus,
    Therapist,
    TherapistStatus,
)
from comms_tasks.projections.upstream import (
    apply_matching_event,
    apply_patient_event,
    apply_therapist_event,
)
from tests import factories as f

THERAPIST = "comms.handle_therapist_event"
MATCHING = "comms.handle_matching_event"
PATIENT = "comms.handle_patient_event"


def therapist_event(db: Session, raw: dict[str, Any]) -> None:
    apply_therapist_event(db, validate_event(THERAPIST, raw))
    db.flush()


def matching_event(db: Session, raw: dict[str, Any]) -> None:
    apply_matching_event(db, validate_event(MATCHING, raw))
    db.flush()


def patient_event(db: Session, raw: dict[str, Any]) -> None:
    apply_patient_event(db, validate_event(PATIENT, raw))
    db.flush()


def test_upsert_creates_then_updates_a_therapist(db: Session) -> None:
    therapist_event(db, f.therapist_upserted(7, occurred_at=f.at(0)))
    therapist_event(
        db,
        f.therapist_upserted(7, occurred_at=f.at(5), status="blocked", last_name="Weber-Schmidt"),
    )
    therapist = db.get(Therapist, 7)
    assert therapist is not None
    assert therapist.status is TherapistStatus.BLOCKED
    assert therapist.last_name == "Weber-Schmidt"
    assert therapist.last_event_at == f.at(5)


def test_availability_is_stored_merged_and_sorted(db: Session) -> None:
    availability = {
        "tuesday": [
            {"start": "14:00", "end": "15:00"},
            {"start": "08:00", "end": "09:00"},
            {"start": "08:30", "end": "10:00"},
        ],
        "monday": [{"start": "12:00", "end": "12:30"}],
    }
    therapist_event(db, f.therapist_upserted(3, phone_availability=availability))
    therapist = db.get(Therapist, 3)
    assert therapist is not None
    assert therapist.phone_availability == {
        "monday": [{"start": "12:00", "end": "12:30"}],
        "tuesday": [{"start": "08:00", "end": "10:00"}, {"start": "14:00", "end": "15:00"}],
    }


def test_older_therapist_event_changes_nothing(db: Session) -> None:
    therapist_event(db, f.therapist_upserted(7, occurred_at=f.at(10), email="neu@praxis.de"))
    therapist_event(db, f.therapist_upserted(7, occurred_at=f.at(0), email="alt@praxis.de"))
    therapist = db.get(Therapist, 7)
    assert therapist is not None
    assert therapist.email == "neu@praxis.de"
    assert therapist.last_event_at == f.at(10)


def test_delete_is_not_undone_by_an_older_upsert(db: Session) -> None:
    therapist_event(db, f.therapist_deleted(9, occurred_at=f.at(10)))
    therapist_event(db, f.therapist_upserted(9, occurred_at=f.at(0)))
    therapist = db.get(Therapist, 9)
    assert therapist is not None
    assert therapist.deleted_at == f.at(10)
    therapist_event(db, f.therapist_upserted(9, occurred_at=f.at(20)))
    assert therapist.deleted_at is None


def test_request_created_stores_request_and_summary(db: Session) -> None:
    matching_event(
        db,
        f.request_created(
            11, patient_id=500, therapist_id=2, diagnosis="F41.1 Generalisierte Angststörung"
        ),
    )
    request = db.get(PlacementRequest, 11)
    patient = db.get(Patient, 500)
    assert request is not None and patient is not None
    assert (request.patient_id, request.therapist_id) == (500, 2)
    assert request.status is PlacementRequestStatus.OPEN
    assert patient.diagnosis == "F41.1 Generalisierte Angststörung"
    assert str(patient.registered_on) == "2026-09-14"


def test_status_changes_apply_in_order_only(db: Session) -> None:
    matching_event(db, f.request_created(12, occurred_at=f.at(0)))
    matching_event(db, f.status_changed(12, "accepted", occurred_at=f.at(10)))
    matching_event(db, f.status_changed(12, "in_progress", occurred_at=f.at(5)))
    request = db.get(PlacementRequest, 12)
    assert request is not None
    assert request.status is PlacementRequestStatus.ACCEPTED


def test_cancelled_event_cancels(db: Session) -> None:
    matching_event(db, f.request_created(13, occurred_at=f.at(0)))
    matching_event(db, f.request_cancelled(13, occurred_at=f.at(1)))
    request = db.get(PlacementRequest, 13)
    assert request is not None
    assert request.status is PlacementRequestStatus.CANCELLED
    assert request.status_reason == "Patient hat anderweitig Platz gefunden"


def test_a_late_created_event_does_not_reopen_a_request(db: Session) -> None:
    matching_event(db, f.request_created(14, occurred_at=f.at(0)))
    matching_event(db, f.status_changed(14, "rejected", occurred_at=f.at(10)))
    matching_event(db, f.request_created(14, occurred_at=f.at(20)))
    request = db.get(PlacementRequest, 14)
    assert request is not None
    assert request.status is PlacementRequestStatus.REJECTED


def test_a_resent_created_does_not_hide_an_earlier_cancellation(db: Session) -> None:
    matching_event(db, f.request_created(19, occurred_at=f.at(0)))
    # Re-published after an outage: a fresh envelope, a later occurred_at.
    matching_event(db, f.request_created(19, occurred_at=f.at(20)))
    matching_event(db, f.request_cancelled(19, occurred_at=f.at(10)))
    request = db.get(PlacementRequest, 19)
    assert request is not None
    assert request.status is PlacementRequestStatus.CANCELLED
    # Status changes keep their own order: one older than the cancellation changes nothing.
    matching_event(db, f.status_changed(19, "in_progress", occurred_at=f.at(5)))
    assert request.status is PlacementRequestStatus.CANCELLED


def test_a_cancellation_after_creation_applies_when_only_a_resent_created_arrived(
    db: Session,
) -> None:
    # The first "created" was lost; its re-send (occurred_at T20) is the first we see.
    matching_event(db, f.request_created(20, created_at=f.at(0), occurred_at=f.at(20)))
    matching_event(db, f.request_cancelled(20, occurred_at=f.at(10)))
    request = db.get(PlacementRequest, 20)
    assert request is not None
    assert request.status is PlacementRequestStatus.CANCELLED


def test_status_change_of_an_unknown_request_is_rejected_naming_the_field(db: Session) -> None:
    with pytest.raises(Rejected) as caught:
        matching_event(db, f.status_changed(999, "accepted"))
    assert "placement_request_id" in caught.value.reason


def test_created_for_another_patient_is_rejected(db: Session) -> None:
    matching_event(db, f.request_created(15, patient_id=1, occurred_at=f.at(0)))
    with pytest.raises(Rejected):
        matching_event(db, f.request_created(15, patient_id=2, occurred_at=f.at(1)))


def test_patient_summary_follows_the_newest_event(db: Session) -> None:
    matching_event(db, f.request_created(16, patient_id=600, occurred_at=f.at(0)))
    patient_event(db, f.patient_updated(600, occurred_at=f.at(10), gender="divers"))
    patient_event(db, f.patient_updated(600, occurred_at=f.at(5), gender="männlich"))
    # A second request of the same patient, created earlier, must not roll the summary back.
    matching_event(
        db, f.request_created(17, patient_id=600, occurred_at=f.at(2), gender="weiblich")
    )
    patient = db.get(Patient, 600)
    assert patient is not None
    assert patient.gender == "divers"


def test_erasure_removes_the_summary_for_good(db: Session) -> None:
    matching_event(db, f.request_created(18, patient_id=700, occurred_at=f.at(0)))
    patient_event(db, f.patient_erased(700, occurred_at=f.at(10)))
    patient_event(db, f.patient_updated(700, occurred_at=f.at(20), diagnosis="F40.1"))
    patient = db.get(Patient, 700)
    assert patient is not None
    assert patient.erased_at == f.at(10)
    assert patient.diagnosis is None
    assert patient.current_complaints is None
    assert db.get(PlacementRequest, 18) is not None
