"""A status change or a dead letter written while ``patient.erased`` commits keeps nothing.

Two real PostgreSQL connections in two threads (:func:`interleave`): the erasure runs
whole and stops before its commit; the late writer (a status change with a reason, a
dead letter naming the patient's request) then runs until it commits or waits for a lock
the erasure holds. Erasure is final: once both have committed, no reason and no
unredacted letter about the erased patient is left.
"""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from comms_tasks.contracts import validate_event
from comms_tasks.models import DeadLetter, DeadLetterStatus, PlacementRequest
from comms_tasks.projections import upstream
from tests import factories as f
from tests.privacy.test_retention import MARKER, MATCHING, PATIENT, THERAPIST, apply
from tests.reliability.test_concurrent_answer import interleave

ERASED = 100
REQUEST = 1001


@pytest.fixture
def a_request(committed_db: Engine) -> Engine:
    apply(THERAPIST, f.therapist_upserted(1))
    apply(MATCHING, f.request_created(REQUEST, patient_id=ERASED, therapist_id=1))
    return committed_db


def erase(session: Session) -> None:
    """What ``patient.erased`` applies, whole."""
    event = validate_event(PATIENT, f.patient_erased(ERASED))
    upstream.apply_patient_event(session, event)
    session.flush()


def status_change(session: Session) -> None:
    event = validate_event(
        MATCHING,
        f.status_changed(REQUEST, "cancelled", occurred_at=f.at(30), reason=f"{MARKER} reason"),
    )
    upstream.apply_matching_event(session, event)
    session.flush()


def dead_letter(session: Session) -> None:
    session.add(
        DeadLetter(
            task_name="comms.record_email_response",
            message_id=None,
            reason="email_id: no such email",
            payload={
                "email_id": 999,
                "content": MARKER,
                "outcomes": [
                    {"placement_request_id": REQUEST, "outcome": "accepted", "notes": MARKER}
                ],
            },
            status=DeadLetterStatus.PENDING,
            received_at=dt.datetime.now(dt.UTC),
        )
    )
    session.flush()


def test_a_status_change_during_an_erasure_keeps_no_reason(a_request: Engine) -> None:
    interleave(a_request, erase, None, status_change)
    with Session(a_request) as session:
        request = session.get_one(PlacementRequest, REQUEST)
        assert request.status.value == "cancelled"
        assert request.status_reason is None


def test_a_dead_letter_stored_during_an_erasure_is_kept_redacted(a_request: Engine) -> None:
    interleave(a_request, erase, None, dead_letter)
    with Session(a_request) as session:
        [letter] = session.query(DeadLetter).all()
        assert letter.payload_redacted_at is not None
        assert MARKER not in str(letter.payload)


@pytest.mark.parametrize("writer", [status_change, dead_letter], ids=["status", "letter"])
def test_an_erasure_after_a_late_writer_still_removes_its_text(
    a_request: Engine, writer: object
) -> None:
    interleave(a_request, writer, None, erase)  # type: ignore[arg-type]
    with Session(a_request) as session:
        assert session.get_one(PlacementRequest, REQUEST).status_reason is None
        for letter in session.query(DeadLetter).all():
            assert MARKER not in str(letter.payload)
