"""A follow-up call never survives an answer or a withdrawal that races with its booking.

Two real PostgreSQL connections in two threads. The first transaction is stopped at a
chosen point (a statement about to run, or its commit); the second runs until it commits
or waits for a lock the first holds; then the first goes on. Whatever the order, the end
state must be consistent: an answered email has no scheduled call, and no scheduled call
is about nothing but withdrawn requests.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.orm import Session

from comms_tasks.calls import follow_up
from comms_tasks.contracts import received
from comms_tasks.db import transaction
from comms_tasks.emails import answers
from comms_tasks.models import Email, PhoneCall, PhoneCallStatus, PlacementRequest
from comms_tasks.models.enums import PENDING_REQUEST_STATUSES
from comms_tasks.projections import upstream
from comms_tasks.settings import get_settings
from tests import factories as f
from tests.calls.test_calls import MATCHING, apply
from tests.calls.test_follow_up_check import email_sent_at

STEP_TIMEOUT = 20
INSERT_CALL = "INSERT INTO communication_service.phone_calls"


class Paused:
    """Stops one thread's transaction when it is about to run ``statement`` (or commit)."""

    def __init__(self, engine: Engine, statement: str | None) -> None:
        self.engine = engine
        self.statement = statement
        self.thread: threading.Thread | None = None
        self.reached = threading.Event()
        self.resume = threading.Event()

    def _stop_here(self) -> None:
        if threading.current_thread() is self.thread and not self.reached.is_set():
            self.reached.set()
            assert self.resume.wait(STEP_TIMEOUT), "never resumed"

    def _before_execute(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if self.statement is not None and statement.startswith(self.statement):
            self._stop_here()

    def _before_commit(self, _conn: Any) -> None:
        if self.statement is None:
            self._stop_here()

    def __enter__(self) -> Paused:
        event.listen(self.engine, "before_cursor_execute", self._before_execute)
        event.listen(self.engine, "commit", self._before_commit)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before_execute)
        event.remove(self.engine, "commit", self._before_commit)


def interleave(
    engine: Engine,
    first: Callable[[Session], object],
    pause_before: str | None,
    second: Callable[[Session], object],
) -> None:
    """``first`` up to ``pause_before`` (None: its commit), then ``second`` until it commits
    or waits for a lock, then the rest of both. Each in a transaction of its own."""
    assert run_interleaved(Paused(engine, pause_before), first, second) == []


def run_interleaved(
    paused: Paused, first: Callable[[Session], object], second: Callable[[Session], object]
) -> list[BaseException]:
    """``first`` until ``paused`` stops it, ``second`` until it commits or waits for a lock,
    then the rest of both; the errors either raised."""
    engine = paused.engine
    errors: list[BaseException] = []
    second_pid: list[int] = []
    second_done = threading.Event()

    def run(work: Callable[[Session], object], pid: list[int] | None = None) -> None:
        try:
            with Session(engine) as session, session.begin():
                if pid is not None:
                    pid.append(session.scalars(text("SELECT pg_backend_pid()")).one())
                work(session)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with paused:
        paused.thread = threading.Thread(target=run, args=(first,))
        paused.thread.start()
        assert paused.reached.wait(STEP_TIMEOUT), "the first never reached its stop"

        def run_second() -> None:
            run(second, second_pid)
            second_done.set()

        other = threading.Thread(target=run_second)
        other.start()
        deadline = time.monotonic() + STEP_TIMEOUT
        while not second_done.is_set() and not _waits_for_a_lock(engine, second_pid):
            assert time.monotonic() < deadline, "the second neither finished nor waited"
            time.sleep(0.02)
        paused.resume.set()
        paused.thread.join(STEP_TIMEOUT)
        other.join(STEP_TIMEOUT)
        assert not paused.thread.is_alive() and not other.is_alive(), "a transaction hung"
    return errors


def _waits_for_a_lock(engine: Engine, pid: list[int]) -> bool:
    if not pid:
        return False
    with engine.connect() as connection:
        wait = connection.scalar(
            text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
            {"pid": pid[0]},
        )
    return wait == "Lock"


def scheduled_calls(engine: Engine, email_id: int) -> list[int]:
    """The ids of the email's calls still scheduled."""
    with Session(engine) as session:
        return list(
            session.scalars(
                select(PhoneCall.id)
                .where(PhoneCall.email_id == email_id)
                .where(PhoneCall.status == PhoneCallStatus.SCHEDULED)
            )
        )


def unanswered_email(*, requests_left: int = 2) -> int:
    """An email sent nine days ago, marked by the follow-up check."""
    sent = dt.datetime.now(dt.UTC) - dt.timedelta(days=9)
    email_id = email_sent_at(1, sent)
    if requests_left == 1:
        assert apply(MATCHING, f.status_changed(10, "rejected", occurred_at=f.at(60))) == "applied"
    with transaction() as session:
        assert (
            follow_up.request_follow_up_calls(session, dt.datetime.now(dt.UTC), get_settings()) == 1
        )
    return email_id


def schedule(email_id: int) -> Callable[[Session], object]:
    def work(session: Session) -> None:
        follow_up.schedule_follow_ups(session, [email_id], dt.datetime.now(dt.UTC), get_settings())

    return work


def answer(email_id: int) -> Callable[[Session], object]:
    command = received.RecordEmailResponse.model_validate_json(
        json.dumps(
            {
                "command_id": str(uuid.uuid4()),
                "email_id": email_id,
                "received_at": dt.datetime.now(dt.UTC).isoformat(),
                "content": "Ich habe leider keinen Platz frei.",
                "outcomes": [],
            }
        )
    )

    def work(session: Session) -> None:
        answers.record_response(session, command, dt.datetime.now(dt.UTC), get_settings())

    return work


def withdraw(request_id: int) -> Callable[[Session], object]:
    def work(session: Session) -> None:
        upstream.change_request_status(
            session, request_id, "rejected", None, dt.datetime.now(dt.UTC)
        )

    return work


@pytest.mark.parametrize(
    "booking_first", [True, False], ids=["booking-then-answer", "answer-then-booking"]
)
def test_an_answer_during_booking_leaves_no_scheduled_call(
    committed_db: Engine, booking_first: bool
) -> None:
    email_id = unanswered_email()
    if booking_first:
        interleave(committed_db, schedule(email_id), INSERT_CALL, answer(email_id))
    else:
        interleave(committed_db, answer(email_id), None, schedule(email_id))
    with Session(committed_db) as session:
        assert session.get_one(Email, email_id).response_received
    assert scheduled_calls(committed_db, email_id) == []


@pytest.mark.parametrize(
    "booking_first", [True, False], ids=["booking-then-withdrawal", "withdrawal-then-booking"]
)
def test_a_withdrawal_during_booking_leaves_no_call_about_nothing(
    committed_db: Engine, booking_first: bool
) -> None:
    email_id = unanswered_email(requests_left=1)
    if booking_first:
        interleave(committed_db, schedule(email_id), INSERT_CALL, withdraw(11))
    else:
        interleave(committed_db, withdraw(11), None, schedule(email_id))
    with Session(committed_db) as session:
        request = session.get_one(PlacementRequest, 11)
        assert request.status not in PENDING_REQUEST_STATUSES
    assert scheduled_calls(committed_db, email_id) == []
