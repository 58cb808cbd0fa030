"""``patient.erased`` and the writers that touch its patient take their locks in one order.

Lock order, everywhere: booking lock -> patients -> emails -> requests -> calls. The
erasure locks the patient ``FOR UPDATE``, then the patient's emails, requests and calls;
a writer that renders or books about a patient share-locks it before any email, request
or call. Two real PostgreSQL connections in two threads: the writer stops at the
statement where it used to take its second lock, the erasure runs until it commits or
waits, then both go on. Neither is aborted as a deadlock (40P01), and nothing of the
erased patient is rendered.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.calls import outcomes, requested_calls
from comms_tasks.calls.tasks import follow_up_check, schedule_calls
from comms_tasks.contracts import Rejected, validate_command, validate_event
from comms_tasks.emails import answers, composing, requested_emails
from comms_tasks.models import Email, EmailStatus, EmailTemplate, Patient, PhoneCall, Therapist
from comms_tasks.projections import upstream
from comms_tasks.settings import get_settings
from comms_tasks.task_names import (
    QUEUE_EMAIL,
    RECORD_CALL_OUTCOME,
    RECORD_EMAIL_RESPONSE,
    SCHEDULE_CALL,
)
from tests import factories as f
from tests.calls.test_calls import MATCHING, PATIENT, apply, calls_of, outcome, sent_email
from tests.calls.test_calls import now as utc_now
from tests.privacy.test_retention import MARKER
from tests.reliability.test_concurrent_answer import Paused, interleave, run_interleaved

Stop = Callable[[str, Any], bool]


class PausedWhen(Paused):
    """Stops the first thread's transaction before the first statement ``stop`` picks."""

    def __init__(self, engine: Engine, stop: Stop) -> None:
        super().__init__(engine, "")
        self.stop = stop

    def _before_execute(
        self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any
    ) -> None:
        if self.stop(statement, parameters):
            self._stop_here()


def interleave_at(
    engine: Engine,
    first: Callable[[Session], object],
    stop: Stop,
    second: Callable[[Session], object],
) -> list[BaseException]:
    """As test_concurrent_answer.interleave, stopping where ``stop`` says; the errors."""
    return run_interleaved(PausedWhen(engine, stop), first, second)


def erasure_of(patient_id: int) -> Callable[[Session], None]:
    def erase(session: Session) -> None:
        event = validate_event(PATIENT, f.patient_erased(patient_id))
        upstream.apply_patient_event(session, event)

    return erase


def first_share_lock(statement: str, _parameters: Any) -> bool:
    return "FOR SHARE" in statement


def erased(engine: Engine, patient_id: int) -> bool:
    with Session(engine) as session:
        return session.get_one(Patient, patient_id).erased_at is not None


def test_a_requested_confirmation_and_an_erasure_do_not_deadlock(committed_db: Engine) -> None:
    sent_email(1)
    assert (
        apply(MATCHING, f.status_changed(10, "accepted", occurred_at=f.at(30), reason="by phone"))
        == "applied"
    )
    command = validate_command(
        QUEUE_EMAIL,
        {
            "command_id": str(uuid.uuid4()),
            "therapist_id": 1,
            "template": "confirmation",
            "placement_request_ids": [10],
            "reply_to_email_id": None,
        },
    )

    def confirm(session: Session) -> None:
        requested_emails.queue_requested_email(session, command, utc_now(), get_settings())

    errors = interleave_at(committed_db, confirm, first_share_lock, erasure_of(10))
    assert errors == []
    assert erased(committed_db, 10)


def test_an_answer_to_a_reminder_and_an_erasure_do_not_deadlock(committed_db: Engine) -> None:
    original = sent_email(2)
    with Session(committed_db) as session, session.begin():
        draft = composing.Draft(
            session.get_one(Therapist, 2),
            EmailTemplate.FOLLOW_UP,
            [20, 21],
            f"reminder:{original.id}",
            in_reply_to=session.get_one(Email, original.id),
        )
        [reminder] = composing.queue_emails(
            session, [draft], settings=get_settings(), now=utc_now()
        )
        reminder.status = EmailStatus.SENT
        reminder.sent_at = utc_now()
        reminder_id = reminder.id
    assert reminder_id > original.id
    command = validate_command(
        RECORD_EMAIL_RESPONSE,
        {
            "command_id": str(uuid.uuid4()),
            "email_id": reminder_id,
            "received_at": utc_now().isoformat(),
            "content": None,
            "outcomes": [{"placement_request_id": 21, "outcome": "rejected", "notes": None}],
        },
    )

    def answer(session: Session) -> None:
        answers.record_response(session, command, utc_now(), get_settings())

    def original_locked(statement: str, parameters: Any) -> bool:
        values = parameters.values() if isinstance(parameters, dict) else ()
        return (
            statement.startswith("SELECT communication_service.emails.")
            and "FOR UPDATE" in statement
            and original.id in values
        )

    errors = interleave_at(committed_db, answer, original_locked, erasure_of(20))
    assert errors == []
    assert erased(committed_db, 20)


def test_an_accepted_call_outcome_and_an_erasure_do_not_deadlock(committed_db: Engine) -> None:
    sent_email(3)
    follow_up_check()
    schedule_calls()
    [call] = calls_of(committed_db)
    command = validate_command(
        RECORD_CALL_OUTCOME,
        outcome(
            call.id,
            "completed",
            requests=[
                {
                    "placement_request_id": 30,
                    "discussed": True,
                    "outcome": "accepted",
                    "notes": None,
                }
            ],
        ),
    )

    def call_outcome(session: Session) -> None:
        outcomes.record_call_outcome(session, command, utc_now(), get_settings())

    def call_locked(statement: str, _parameters: Any) -> bool:
        return statement.startswith("SELECT communication_service.phone_calls.") and (
            "FOR UPDATE" in statement
        )

    errors = interleave_at(committed_db, call_outcome, call_locked, erasure_of(30))
    assert errors == []
    assert erased(committed_db, 30)
    with Session(committed_db) as session:
        assert session.scalars(select(PhoneCall.status)).one().value == "completed"


def test_schedule_call_with_notes_and_an_erasure_keep_no_notes_about_the_erased(
    committed_db: Engine,
) -> None:
    sent_email(4, days_ago=1)
    for request_id, first in ((40, "erasure"), (41, "booking")):
        command = validate_command(
            SCHEDULE_CALL,
            {
                "command_id": str(uuid.uuid4()),
                "therapist_id": 4,
                "placement_request_ids": [request_id],
                "at": None,
                "notes": f"{MARKER} notes",
            },
        )
        refused: list[str] = []

        def book(session: Session, command: Any = command, refused: list[str] = refused) -> None:
            try:
                requested_calls.schedule_requested_call(session, command, utc_now(), get_settings())
            except Rejected as exc:
                refused.append(str(exc))

        if first == "erasure":
            interleave(committed_db, erasure_of(request_id), None, book)
            assert refused and "the request's patient was erased" in refused[0]
        else:
            interleave(committed_db, book, None, erasure_of(request_id))
            assert refused == []
    with Session(committed_db) as session:
        for call in session.scalars(select(PhoneCall)):
            assert MARKER not in (call.notes or ""), call.id
