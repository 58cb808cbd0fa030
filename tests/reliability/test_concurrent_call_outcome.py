"""A call's outcome and a command booking a call, racing an answer or a withdrawal.

Two real PostgreSQL connections in two threads (the pattern of
``test_concurrent_answer``): whatever the order, neither transaction deadlocks, an
answered email has no scheduled call, and no scheduled call is about withdrawn requests
only.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from comms_tasks.calls import follow_up, outcomes, requested_calls, scheduling
from comms_tasks.contracts import Rejected, received
from comms_tasks.db import transaction
from comms_tasks.models import Email, PhoneCall, PhoneCallBatch, PhoneCallStatus
from comms_tasks.settings import get_settings
from tests.reliability.test_concurrent_answer import (
    INSERT_CALL,
    answer,
    interleave,
    scheduled_calls,
    unanswered_email,
    withdraw,
)

UPDATE_EMAIL = "UPDATE communication_service.emails"


def booked_call(*, requests_left: int = 2, attempt: int = 1) -> tuple[int, int]:
    """An unanswered email and its scheduled follow-up call: (email id, call id)."""
    email_id = unanswered_email(requests_left=requests_left)
    with transaction() as session:
        report = follow_up.schedule_follow_ups(
            session, [email_id], dt.datetime.now(dt.UTC), get_settings()
        )
        assert report.scheduled == 1
    [call_id] = scheduled_calls_of(email_id)
    if attempt != 1:
        with transaction() as session:
            session.execute(
                update(PhoneCall).where(PhoneCall.id == call_id).values(attempt=attempt)
            )
    return email_id, call_id


def scheduled_calls_of(email_id: int) -> list[int]:
    with transaction() as session:
        return list(
            session.scalars(
                select(PhoneCall.id)
                .where(PhoneCall.email_id == email_id)
                .where(PhoneCall.status == PhoneCallStatus.SCHEDULED)
            )
        )


def tolerant(work: Callable[[Session], object]) -> Callable[[Session], object]:
    """A command the other transaction made pointless may be rejected: a dead letter."""

    def run(session: Session) -> None:
        try:
            with session.begin_nested():
                work(session)
        except Rejected:
            pass

    return run


def not_answered(call_id: int) -> Callable[[Session], object]:
    command = received.RecordCallOutcome.model_validate_json(
        json.dumps(
            {
                "command_id": str(uuid.uuid4()),
                "call_id": call_id,
                "status": "failed",
                "occurred_at": dt.datetime.now(dt.UTC).isoformat(),
                "outcome": None,
                "notes": None,
                "retry_after": None,
                "requests": [],
            }
        )
    )

    def work(session: Session) -> None:
        outcomes.record_call_outcome(session, command, dt.datetime.now(dt.UTC), get_settings())

    return tolerant(work)


def schedule_command(therapist_id: int, request_ids: list[int]) -> Callable[[Session], object]:
    command = received.ScheduleCall.model_validate_json(
        json.dumps(
            {
                "command_id": str(uuid.uuid4()),
                "therapist_id": therapist_id,
                "placement_request_ids": request_ids,
                "at": None,
                "notes": None,
            }
        )
    )

    def work(session: Session) -> None:
        requested_calls.schedule_requested_call(
            session, command, dt.datetime.now(dt.UTC), get_settings()
        )

    return tolerant(work)


def live_calls_about_only(engine: Engine, request_id: int) -> list[int]:
    """Scheduled calls whose every request is ``request_id``."""
    with Session(engine) as session:
        found = []
        for call in session.scalars(
            select(PhoneCall).where(PhoneCall.status == PhoneCallStatus.SCHEDULED)
        ):
            if {batch.placement_request_id for batch in call.batches} == {request_id}:
                found.append(call.id)
        return found


@pytest.mark.parametrize(
    "outcome_first", [True, False], ids=["retry-then-withdrawal", "withdrawal-then-retry"]
)
def test_a_withdrawal_during_a_retry_booking_leaves_no_call_about_nothing(
    committed_db: Engine, outcome_first: bool
) -> None:
    email_id, call_id = booked_call(requests_left=1)
    if outcome_first:
        interleave(committed_db, not_answered(call_id), INSERT_CALL, withdraw(11))
    else:
        interleave(committed_db, withdraw(11), None, not_answered(call_id))
    assert scheduled_calls(committed_db, email_id) == []


@pytest.mark.parametrize(
    "command_first", [True, False], ids=["command-then-withdrawal", "withdrawal-then-command"]
)
def test_a_withdrawal_during_a_schedule_call_command_leaves_no_call_about_it(
    committed_db: Engine, command_first: bool
) -> None:
    unanswered_email()
    if command_first:
        interleave(committed_db, schedule_command(1, [11]), INSERT_CALL, withdraw(11))
    else:
        interleave(committed_db, withdraw(11), None, schedule_command(1, [11]))
    assert live_calls_about_only(committed_db, 11) == []


@pytest.mark.parametrize(
    ("attempt", "pause_before"),
    [(1, INSERT_CALL), (scheduling.MAX_CALL_ATTEMPTS, UPDATE_EMAIL)],
    ids=["retried", "given-up"],
)
def test_an_answer_during_a_call_outcome_neither_deadlocks_nor_leaves_a_call(
    committed_db: Engine, attempt: int, pause_before: str
) -> None:
    email_id, call_id = booked_call(attempt=attempt)
    # The outcome holds the call when the answer comes: the answer waits for it (the
    # email first, then its calls), and the outcome must not then wait for the answer.
    interleave(committed_db, not_answered(call_id), pause_before, answer(email_id))
    with Session(committed_db) as session:
        assert session.get_one(Email, email_id).response_received
        assert session.get_one(PhoneCall, call_id).status is PhoneCallStatus.FAILED
    assert scheduled_calls(committed_db, email_id) == []


def test_a_call_outcome_after_an_answer_books_no_retry(committed_db: Engine) -> None:
    email_id, call_id = booked_call()
    interleave(committed_db, answer(email_id), None, not_answered(call_id))
    assert scheduled_calls(committed_db, email_id) == []
    with Session(committed_db) as session:
        batches = session.scalars(select(PhoneCallBatch.phone_call_id)).all()
    assert set(batches) == {call_id}
