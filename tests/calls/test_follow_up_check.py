"""The daily follow-up check on real PostgreSQL: when an email is due, and that it settles.

The check runs with a simulated "now"; the retention clock is the wall clock, so emails
that are meant to be old are backdated.
"""

from __future__ import annotations

import datetime as dt
import uuid
import zoneinfo
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, func, select, update
from sqlalchemy.orm import Session

from comms_tasks.calls import follow_up
from comms_tasks.db import transaction
from comms_tasks.emails import rechecks, weekly
from comms_tasks.models import (
    Email,
    EmailStatus,
    EmailTemplate,
    OutboxEvent,
    Patient,
    PlacementRequest,
    PlacementRequestStatus,
    Therapist,
    TherapistStatus,
)
from comms_tasks.privacy import retention
from comms_tasks.settings import get_settings
from comms_tasks.task_names import RECORD_EMAIL_RESPONSE
from tests import factories as f
from tests.calls.test_calls import ALL_WEEK, MATCHING, THERAPIST, apply

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def local(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=BERLIN).astimezone(dt.UTC)


def email_sent_at(
    therapist_id: int, sent_at: dt.datetime, *, withdrawn: bool = False, **therapist: object
) -> int:
    """An asking email about two requests of a new therapist, sent at ``sent_at``."""
    therapist.setdefault("phone_availability", ALL_WEEK)
    assert apply(THERAPIST, f.therapist_upserted(therapist_id, **therapist)) == "applied"
    request_ids = (therapist_id * 10, therapist_id * 10 + 1)
    for request_id in request_ids:
        created = f.request_created(request_id, patient_id=request_id, therapist_id=therapist_id)
        assert apply(MATCHING, created) == "applied"
    with transaction() as session:
        [email_id] = weekly.batch_chunk(session, [therapist_id], sent_at, get_settings()).email_ids
        email = session.get(Email, email_id)
        assert email is not None
        email.status = EmailStatus.SENT
        email.sent_at = sent_at
    if withdrawn:
        for request_id in request_ids:
            change = f.status_changed(request_id, "rejected", occurred_at=f.at(60))
            assert apply(MATCHING, change) == "applied"
    return email_id


def check(at: dt.datetime) -> tuple[int, follow_up.ScheduleReport]:
    """``comms.follow_up_check`` and ``comms.schedule_calls`` as they would run at ``at``."""
    settings = get_settings()
    with transaction() as session:
        marked = follow_up.request_follow_up_calls(session, at, settings)
    with transaction() as session:
        waiting = follow_up.waiting_for_call(session)
        report = follow_up.schedule_follow_ups(session, waiting, at, settings)
    return marked, report


def test_an_email_with_nothing_left_to_discuss_is_settled_once(domain_db: Connection) -> None:
    sent = local(2026, 11, 2, 6, 0)
    email_id = email_sent_at(1, sent, withdrawn=True)
    marked, report = check(sent + dt.timedelta(days=7, hours=3))
    assert (marked, report.nothing_left) == (1, 1)
    for days in (8, 9, 199):
        marked, report = check(sent + dt.timedelta(days=days, hours=3))
        assert (marked, report.nothing_left, report.scheduled) == (0, 0, 0), f"day {days}"
    with Session(domain_db) as session:
        email = session.get(Email, email_id)
        assert email is not None
        assert email.follow_up_settled_at is not None
        assert not email.follow_up_required


def backdate(engine: Engine, email_id: int, sent_at: dt.datetime) -> None:
    """The email went out at ``sent_at`` and nothing happened to it since."""
    with Session(engine) as session, session.begin():
        session.execute(
            update(Email)
            .where(Email.id == email_id)
            .values(sent_at=sent_at, queued_at=sent_at, last_activity_at=sent_at)
        )


def test_follow_up_housekeeping_does_not_move_the_retention_clock(domain_db: Connection) -> None:
    """Retention counts from the last activity (sent, answered), not from the check's marks."""
    wall = dt.datetime.now(dt.UTC)
    days = get_settings().retention_days
    settled = email_sent_at(1, wall - dt.timedelta(days=days + 20), withdrawn=True)
    flagged = email_sent_at(2, wall - dt.timedelta(days=days + 20), phone_availability=None)
    answered = email_sent_at(3, wall - dt.timedelta(days=days + 20))
    recent = email_sent_at(4, wall - dt.timedelta(days=days - 10), withdrawn=True)
    for email_id, days_ago in ((settled, days + 20), (flagged, days + 20), (answered, days + 20)):
        backdate(domain_db, email_id, wall - dt.timedelta(days=days_ago))
    backdate(domain_db, recent, wall - dt.timedelta(days=days - 10))
    response = {
        "command_id": str(uuid.uuid4()),
        "email_id": answered,
        "received_at": wall.isoformat(),
        "content": "Ich melde mich nächste Woche.",
        "outcomes": [],
    }
    assert apply(RECORD_EMAIL_RESPONSE, response) == "applied"

    marked, report = check(wall)
    assert (marked, report.nothing_left, report.unschedulable) == (3, 2, 1)
    with transaction() as session:
        redacted = retention.purge_expired(session, wall, days, limit=100)
    with Session(domain_db) as session:
        bodies = {
            email_id: session.get_one(Email, email_id).body_text
            for email_id in (settled, flagged, answered, recent)
        }
    assert bodies[settled] == rechecks.REDACTED_TEXT
    assert bodies[flagged] == rechecks.REDACTED_TEXT
    # Answered today: that is activity.
    assert bodies[answered] != rechecks.REDACTED_TEXT
    assert bodies[recent] != rechecks.REDACTED_TEXT
    assert redacted == 2


@pytest.mark.parametrize(
    ("sent", "not_yet", "due"),
    [
        # Monday 09:05 after retries; the next Monday's 09:00 check is due (day D+7).
        (local(2026, 11, 2, 9, 5), local(2026, 11, 8, 23, 59), local(2026, 11, 9, 9, 0)),
        # Across the spring change (29 March): day D+7 starts at local midnight.
        (local(2026, 3, 28, 23, 30), local(2026, 4, 3, 23, 59), local(2026, 4, 4, 0, 15)),
        # Across the autumn change (25 October).
        (local(2026, 10, 24, 0, 10), local(2026, 10, 30, 23, 30), local(2026, 10, 31, 0, 30)),
    ],
    ids=["monday-09:05", "spring-forward", "fall-back"],
)
def test_an_email_is_due_from_the_seventh_local_calendar_day(
    domain_db: Connection, sent: dt.datetime, not_yet: dt.datetime, due: dt.datetime
) -> None:
    assert get_settings().zone == BERLIN
    email_sent_at(1, sent)
    assert check(not_yet)[0] == 0
    assert check(due)[0] == 1


# --- the no-slot path in bulk ---------------------------------------------------------------


def seed_unanswered(
    session: Session, therapist_ids: range, sent_at: dt.datetime, availability: object = None
) -> None:
    """Therapists (without phone availability unless given), each with one request asked
    about in an email sent at ``sent_at``."""
    for therapist_id in therapist_ids:
        session.add(
            Therapist(
                id=therapist_id,
                salutation="Frau",
                first_name="Anna",
                last_name=f"Weber{therapist_id}",
                email=f"praxis{therapist_id}@weber-therapie.de",
                phone="+49 30 1234567",
                phone_availability=availability,
                status=TherapistStatus.ACTIVE,
                last_event_at=sent_at,
            )
        )
        session.add(Patient(id=therapist_id, diagnosis="F32.1", summary_event_at=sent_at))
        session.add(
            PlacementRequest(
                id=therapist_id,
                patient_id=therapist_id,
                therapist_id=therapist_id,
                status=PlacementRequestStatus.OPEN,
                created_at=sent_at,
                last_event_at=sent_at,
            )
        )
    session.flush()
    report = weekly.batch_chunk(session, list(therapist_ids), sent_at, get_settings())
    session.execute(
        update(Email)
        .where(Email.id.in_(report.email_ids))
        .values(status=EmailStatus.SENT, sent_at=sent_at)
    )


def count_statements(session: Session, work: Callable[[], object]) -> int:
    statements = 0

    def count(*_: object) -> None:
        nonlocal statements
        statements += 1

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", count)
    try:
        work()
    finally:
        event.remove(connection, "before_cursor_execute", count)
    return statements


def no_slot_run(session: Session, at: dt.datetime, expected: int) -> int:
    """Statements of one follow-up check and scheduling run; every email has no slot."""

    def run() -> None:
        settings = get_settings()
        follow_up.request_follow_up_calls(session, at, settings)
        report = follow_up.schedule_follow_ups(
            session, follow_up.waiting_for_call(session), at, settings
        )
        assert report.unschedulable == expected

    return count_statements(session, run)


def test_the_no_slot_path_costs_a_few_statements_however_many_emails(db: Session) -> None:
    sent = local(2026, 11, 2, 8, 0)
    at = sent + dt.timedelta(days=8)
    seed_unanswered(db, range(1, 101), sent)
    hundred = no_slot_run(db, at, 100)
    seed_unanswered(db, range(1001, 1201), sent)
    two_hundred = no_slot_run(db, at, 200)
    # Each email got its reminder, its flag and its event.
    reminders = db.scalar(
        select(func.count()).select_from(Email).where(Email.template == EmailTemplate.FOLLOW_UP)
    )
    assert reminders == 300
    unschedulable = db.scalar(
        select(func.count())
        .select_from(OutboxEvent)
        .where(OutboxEvent.event_type == "call.unschedulable")
    )
    assert unschedulable == 300
    assert two_hundred - hundred < 10, (hundred, two_hundred)


def test_the_check_reads_its_candidates_from_their_own_index(db: Session) -> None:
    """The check's condition implies the partial index's, so that its daily work does not
    grow with every email ever sent (the planner could never use the index otherwise)."""
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "FOR UPDATE SKIP LOCKED" in statement:
            captured.append((statement, parameters))

    connection = db.connection()
    event.listen(connection, "before_cursor_execute", capture)
    try:
        follow_up.request_follow_up_calls(db, local(2026, 11, 20, 9, 0), get_settings())
    finally:
        event.remove(connection, "before_cursor_execute", capture)
    [(statement, parameters)] = captured
    connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
    plan = connection.exec_driver_sql(f"EXPLAIN {statement}", parameters).scalars().all()
    assert any("ix_emails_follow_up_due" in line for line in plan), "\n".join(plan)
