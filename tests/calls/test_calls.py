"""Follow-up calls on real PostgreSQL: the check, booking, outcomes, the call sheet."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import icalendar
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from comms_tasks.appliers import APPLIERS
from comms_tasks.calls import follow_up, scheduling
from comms_tasks.calls.tasks import follow_up_check, schedule_calls
from comms_tasks.db import transaction
from comms_tasks.emails import weekly
from comms_tasks.inbound.inbox import handle
from comms_tasks.models import (
    Email,
    EmailStatus,
    EmailTemplate,
    OutboxEvent,
    PhoneCall,
    PhoneCallStatus,
    Therapist,
)
from comms_tasks.settings import get_settings
from comms_tasks.task_names import RECORD_CALL_OUTCOME, RECORD_EMAIL_RESPONSE, SCHEDULE_CALL
from tests import factories as f
from tests.conftest import WorkerProcess, wait_for, worker_environment

THERAPIST = "comms.handle_therapist_event"
MATCHING = "comms.handle_matching_event"
PATIENT = "comms.handle_patient_event"
COMMS = str(Path(sys.executable).parent / "comms")
ALL_WEEK = {
    day: [{"start": "08:00", "end": "18:00"}]
    for day in ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def apply(task: str, message: dict[str, Any]) -> str:
    outcome = handle(task, message, APPLIERS[task])
    return outcome.result if outcome.reason is None else f"{outcome.result}: {outcome.reason}"


def sent_email(therapist_id: int, *, days_ago: float = 8, **therapist: Any) -> Email:
    """A therapist with two open requests, asked about in an email sent ``days_ago``."""
    therapist.setdefault("phone_availability", ALL_WEEK)
    assert apply(THERAPIST, f.therapist_upserted(therapist_id, **therapist)) == "applied"
    for request_id in (therapist_id * 10, therapist_id * 10 + 1):
        created = f.request_created(request_id, patient_id=request_id, therapist_id=therapist_id)
        assert apply(MATCHING, created) == "applied"
    sent_at = now() - dt.timedelta(days=days_ago)
    with transaction() as session:
        report = weekly.batch_chunk(session, [therapist_id], sent_at, get_settings())
        [email_id] = report.email_ids
        email = session.get(Email, email_id)
        assert email is not None
        email.status = EmailStatus.SENT
        email.sent_at = sent_at
        return email


def calls_of(engine: Engine) -> list[PhoneCall]:
    with Session(engine) as session:
        found = list(session.scalars(select(PhoneCall).order_by(PhoneCall.id)))
        for call in found:
            _ = call.batches
        return found


def event_types(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(OutboxEvent.event_type).order_by(OutboxEvent.id)))


def test_an_unanswered_email_gets_exactly_one_call(committed_db: Engine) -> None:
    email = sent_email(1)
    assert follow_up_check()["marked"] == 1
    assert schedule_calls()["scheduled"] == 1
    for _ in range(2):
        follow_up_check()
        schedule_calls()
    [call] = calls_of(committed_db)
    assert call.email_id == email.id
    assert call.status is PhoneCallStatus.SCHEDULED
    assert sorted(b.placement_request_id for b in call.batches) == [10, 11]
    assert call.scheduled_at >= now() + dt.timedelta(minutes=119)
    local = call.scheduled_at.astimezone(get_settings().zone)
    assert (call.scheduled_date, call.scheduled_time) == (local.date(), local.time())
    assert call.duration_minutes == 5
    assert event_types(committed_db).count("call.scheduled") == 1


def test_recent_or_answered_emails_get_no_call(committed_db: Engine) -> None:
    sent_email(2, days_ago=6)
    answered = sent_email(3)
    with transaction() as session:
        row = session.get(Email, answered.id)
        assert row is not None
        row.response_received = True
    assert follow_up_check()["marked"] == 0
    schedule_calls()
    assert calls_of(committed_db) == []


def test_withdrawn_requests_are_not_discussed(committed_db: Engine) -> None:
    sent_email(4)
    assert apply(MATCHING, f.request_cancelled(40, occurred_at=f.at(60))) == "applied"
    follow_up_check()
    schedule_calls()
    [call] = calls_of(committed_db)
    assert [b.placement_request_id for b in call.batches] == [41]


def test_erased_patients_requests_are_not_discussed(committed_db: Engine) -> None:
    sent_email(16)
    assert apply(PATIENT, f.patient_erased(160, occurred_at=f.at(60))) == "applied"
    follow_up_check()
    schedule_calls()
    [call] = calls_of(committed_db)
    assert [b.placement_request_id for b in call.batches] == [161]


def test_an_email_about_erased_patients_only_gets_no_call(committed_db: Engine) -> None:
    email = sent_email(18)
    for patient_id in (180, 181):
        assert apply(PATIENT, f.patient_erased(patient_id, occurred_at=f.at(60))) == "applied"
    follow_up_check()
    assert schedule_calls()["nothing_left"] == 1
    assert calls_of(committed_db) == []
    with Session(committed_db) as session:
        assert session.get_one(Email, email.id).follow_up_settled_at is not None


def test_a_retry_leaves_out_an_erased_patients_request(committed_db: Engine) -> None:
    sent_email(17)
    follow_up_check()
    schedule_calls()
    [call] = calls_of(committed_db)
    assert apply(PATIENT, f.patient_erased(170, occurred_at=f.at(60))) == "applied"
    assert apply(RECORD_CALL_OUTCOME, outcome(call.id, "failed")) == "applied"
    _, retry = calls_of(committed_db)
    assert [b.placement_request_id for b in retry.batches] == [171]


def test_no_slot_means_one_threaded_reminder_and_a_flag(committed_db: Engine) -> None:
    original = sent_email(5, phone_availability=None)
    follow_up_check()
    assert schedule_calls()["unschedulable"] == 1
    follow_up_check()
    schedule_calls()
    assert calls_of(committed_db) == []
    with Session(committed_db) as session:
        flagged = session.get(Email, original.id)
        assert flagged is not None
        assert flagged.follow_up_required
        assert flagged.follow_up_notes == "no follow-up call: no phone availability"
        [reminder] = session.scalars(
            select(Email).where(Email.template == EmailTemplate.FOLLOW_UP)
        ).all()
        assert reminder.in_reply_to_email_id == original.id
        assert reminder.status is EmailStatus.QUEUED
    assert event_types(committed_db).count("call.unschedulable") == 1


def outcome(call_id: int, status: str, **fields: Any) -> dict[str, Any]:
    command: dict[str, Any] = {
        "command_id": str(uuid.uuid4()),
        "call_id": call_id,
        "status": status,
        "occurred_at": now().isoformat(),
        "outcome": None,
        "notes": None,
        "retry_after": None,
        "requests": [],
    }
    command.update(fields)
    return command


def test_an_unanswered_call_is_retried_from_the_next_day_at_most_three_times(
    committed_db: Engine,
) -> None:
    sent_email(6)
    follow_up_check()
    schedule_calls()
    zone = get_settings().zone
    tomorrow = (now().astimezone(zone) + dt.timedelta(days=1)).date()
    for attempt in (1, 2, 3):
        call = calls_of(committed_db)[-1]
        assert call.attempt == attempt
        assert apply(RECORD_CALL_OUTCOME, outcome(call.id, "failed")) == "applied"
    first, second, third = calls_of(committed_db)
    assert [c.status for c in (first, second, third)] == [PhoneCallStatus.FAILED] * 3
    assert second.previous_call_id == first.id and third.previous_call_id == second.id
    assert second.scheduled_date >= tomorrow
    assert third.follow_up_required
    with Session(committed_db) as session:
        failed = [
            row.envelope["payload"]
            for row in session.scalars(
                select(OutboxEvent).where(OutboxEvent.event_type == "call.failed")
            )
        ]
        email = session.get(Email, first.email_id)
        assert email is not None and email.follow_up_required
    assert [(e["attempt"], e["next_call_id"]) for e in failed] == [
        (1, second.id),
        (2, third.id),
        (3, None),
    ]


def test_retry_after_moves_the_next_attempt(committed_db: Engine) -> None:
    sent_email(7)
    follow_up_check()
    schedule_calls()
    [call] = calls_of(committed_db)
    later = (now() + dt.timedelta(days=5)).date()
    command = outcome(call.id, "failed", retry_after=later.isoformat())
    assert apply(RECORD_CALL_OUTCOME, command) == "applied"
    retry = calls_of(committed_db)[-1]
    assert retry.scheduled_date >= later


def test_a_completed_call_with_an_acceptance_queues_a_confirmation(committed_db: Engine) -> None:
    sent_email(8)
    follow_up_check()
    schedule_calls()
    [call] = calls_of(committed_db)
    requests = [
        {"placement_request_id": 80, "discussed": True, "outcome": "accepted", "notes": None},
        {"placement_request_id": 81, "discussed": True, "outcome": "rejected", "notes": "voll"},
    ]
    assert apply(RECORD_CALL_OUTCOME, outcome(call.id, "completed", requests=requests)) == (
        "applied"
    )
    [done] = calls_of(committed_db)
    assert done.status is PhoneCallStatus.COMPLETED
    assert {
        (b.placement_request_id, b.outcome.value if b.outcome else None) for b in done.batches
    } == {
        (80, "accepted"),
        (81, "rejected"),
    }
    with Session(committed_db) as session:
        confirmation = session.scalars(
            select(Email).where(Email.template == EmailTemplate.CONFIRMATION)
        ).one()
        assert [b.placement_request_id for b in confirmation.batches] == [80]
    types = event_types(committed_db)
    assert types.count("call.completed") == 1
    assert types.count("placement_request.outcome_recorded") == 2
    again = apply(RECORD_CALL_OUTCOME, outcome(call.id, "completed"))
    assert again == "dead_letter: command.call_id: the call is already completed"


def test_an_email_response_cancels_its_scheduled_call(committed_db: Engine) -> None:
    email = sent_email(9)
    follow_up_check()
    schedule_calls()
    response = {
        "command_id": str(uuid.uuid4()),
        "email_id": email.id,
        "received_at": now().isoformat(),
        "content": "Leider keine Kapazität.",
        "outcomes": [],
    }
    assert apply(RECORD_EMAIL_RESPONSE, response) == "applied"
    [call] = calls_of(committed_db)
    assert call.status is PhoneCallStatus.CANCELLED


def test_withdrawing_every_request_cancels_the_call(committed_db: Engine) -> None:
    sent_email(11)
    follow_up_check()
    schedule_calls()
    for request_id in (110, 111):
        change = f.status_changed(request_id, "rejected", occurred_at=f.at(60))
        assert apply(MATCHING, change) == "applied"
    [call] = calls_of(committed_db)
    assert call.status is PhoneCallStatus.CANCELLED


def schedule_command(
    therapist_id: int, at: dt.datetime | None, requests: list[int] | None = None
) -> dict[str, Any]:
    return {
        "command_id": str(uuid.uuid4()),
        "therapist_id": therapist_id,
        "placement_request_ids": requests or [therapist_id * 10],
        "at": at.isoformat() if at else None,
        "notes": "Rückfrage zur Anfrage",
    }


def local_slot(days_ahead: int, hour: int = 10, minute: int = 0) -> dt.datetime:
    """A local wall time ``days_ahead`` (or the next day that is no public holiday), UTC."""
    settings = get_settings()
    holidays = scheduling.holidays_for(settings.holiday_state)
    day = now().astimezone(settings.zone).date() + dt.timedelta(days=days_ahead)
    while day in holidays:
        day += dt.timedelta(days=1)
    wall = dt.datetime.combine(day, dt.time(hour, minute), tzinfo=settings.zone)
    return wall.astimezone(dt.UTC)


def test_schedule_call_at_a_time_or_in_the_first_free_slot(committed_db: Engine) -> None:
    sent_email(12, days_ago=1)
    at = local_slot(3)
    assert apply(SCHEDULE_CALL, schedule_command(12, at)) == "applied"
    taken = apply(SCHEDULE_CALL, schedule_command(12, at, [121]))
    assert taken == "dead_letter: command.at: the therapist or the operators are busy then"
    assert apply(SCHEDULE_CALL, schedule_command(12, None, [121])) == "applied"
    first, second = calls_of(committed_db)
    assert first.scheduled_at == at
    assert second.scheduled_at != at
    assert second.notes == "Rückfrage zur Anfrage"


def test_a_second_command_about_the_same_requests_books_no_second_call(
    committed_db: Engine,
) -> None:
    sent_email(13, days_ago=1)
    assert apply(SCHEDULE_CALL, schedule_command(13, None)) == "applied"
    # A producer that retries with a fresh command id: the live call serves it.
    assert apply(SCHEDULE_CALL, schedule_command(13, None)) == "applied"
    [call] = calls_of(committed_db)
    assert apply(SCHEDULE_CALL, schedule_command(13, call.scheduled_at)) == "applied"
    assert len(calls_of(committed_db)) == 1
    # Another time, or more requests, is no retry: the caller must cancel the call first.
    elsewhere = apply(SCHEDULE_CALL, schedule_command(13, local_slot(4)))
    both = apply(SCHEDULE_CALL, schedule_command(13, None, [131, 130]))
    assert elsewhere == (
        f"dead_letter: command.placement_request_ids[0]: request 130 is already "
        f"in scheduled call {call.id}"
    )
    assert both == (
        f"dead_letter: command.placement_request_ids[1]: request 130 is already "
        f"in scheduled call {call.id}"
    )
    assert len(calls_of(committed_db)) == 1
    assert event_types(committed_db).count("call.scheduled") == 1


def test_an_explicit_time_must_be_a_slot_of_the_therapist(committed_db: Engine) -> None:
    settings = get_settings()
    sent_email(14, days_ago=1)  # available 08:00-18:00 every day
    today = now().astimezone(settings.zone).date()
    christmas = dt.date(
        today.year if today < dt.date(today.year, 12, 20) else today.year + 1, 12, 25
    )
    night = dt.datetime.combine(christmas, dt.time(3, 7, 30), tzinfo=settings.zone)
    noon = dt.datetime.combine(christmas, dt.time(12, 0), tzinfo=settings.zone)
    weekday = local_slot(3)

    def rejected(at: dt.datetime) -> str:
        return apply(SCHEDULE_CALL, schedule_command(14, at))

    assert rejected(night) == (
        "dead_letter: command.at: not on the 5-minute grid of local time (03:07:30)"
    )
    assert rejected(noon) == f"dead_letter: command.at: {christmas} is a public holiday"
    assert rejected(weekday - dt.timedelta(hours=7)) == (
        "dead_letter: command.at: outside the therapist's phone availability"
    )
    soon = (now() + dt.timedelta(minutes=30)).astimezone(settings.zone)
    soon = soon.replace(minute=soon.minute - soon.minute % 5, second=0, microsecond=0)
    soon += dt.timedelta(minutes=5)
    assert rejected(soon) == (
        f"dead_letter: command.at: less than {settings.call_lead_time_minutes} minutes ahead"
    )
    assert calls_of(committed_db) == []
    assert rejected(weekday) == "applied"


def test_schedule_call_is_refused_for_a_decided_request(committed_db: Engine) -> None:
    sent_email(15, days_ago=1)
    assert apply(MATCHING, f.status_changed(150, "rejected", occurred_at=f.at(60))) == "applied"
    assert apply(SCHEDULE_CALL, schedule_command(15, None, [151, 150])) == (
        "dead_letter: command.placement_request_ids[1]: the request is rejected"
    )
    assert calls_of(committed_db) == []


def test_schedule_call_is_refused_for_an_erased_patients_request(committed_db: Engine) -> None:
    sent_email(19, days_ago=1)
    assert apply(PATIENT, f.patient_erased(190, occurred_at=f.at(60))) == "applied"
    assert apply(SCHEDULE_CALL, schedule_command(19, None, [191, 190])) == (
        "dead_letter: command.placement_request_ids[1]: the request's patient was erased"
    )
    assert calls_of(committed_db) == []


def test_schedule_call_is_refused_for_a_therapist_who_is_not_active(committed_db: Engine) -> None:
    sent_email(16, days_ago=1)
    blocked = f.therapist_upserted(
        16, occurred_at=f.at(60), status="blocked", phone_availability=ALL_WEEK
    )
    assert apply(THERAPIST, blocked) == "applied"
    assert apply(SCHEDULE_CALL, schedule_command(16, None)) == (
        "dead_letter: command.therapist_id: the therapist's status is blocked"
    )
    assert apply(SCHEDULE_CALL, schedule_command(16, local_slot(3))) == (
        "dead_letter: command.therapist_id: the therapist's status is blocked"
    )
    assert calls_of(committed_db) == []


def test_two_schedulers_at_once_book_one_call_per_email_within_capacity(
    committed_db: Engine,
) -> None:
    for therapist_id in range(20, 30):
        sent_email(therapist_id)
    follow_up_check()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            schedule_calls()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a run hung"
    assert errors == []
    booked = calls_of(committed_db)
    assert len(booked) == 10
    assert len({call.email_id for call in booked}) == 10
    # One operator: no two calls share a 5-minute block.
    assert len({call.scheduled_at for call in booked}) == 10
    with Session(committed_db) as session:
        assert session.scalar(select(func.count()).select_from(PhoneCall)) == 10


def comms(committed_url: str, tmp_path: Path, *args: str) -> str:
    result = subprocess.run(
        [COMMS, *args],
        env=worker_environment(COMMS_DATABASE_URL=committed_url, COMMS_VAR_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_the_call_sheet_and_its_calendar(
    committed_db: Engine, committed_url: str, tmp_path: Path
) -> None:
    sent_email(13)
    follow_up_check()
    schedule_calls()
    [call] = calls_of(committed_db)
    day = call.scheduled_date.isoformat()
    sheet = json.loads(comms(committed_url, tmp_path, "calls", "today", "--date", day, "--json"))
    [entry] = sheet["calls"]
    assert entry["call_id"] == call.id
    assert entry["time"] == call.scheduled_time.strftime("%H:%M")
    assert entry["phone"] == "+49 30 1234567"
    assert entry["therapist"] == "Dr. Anna Weber"
    assert [p["placement_request_id"] for p in entry["patients"]] == [130, 131]
    assert entry["patients"][0]["diagnosis"] == "F32.1 Mittelgradige depressive Episode"
    table = comms(committed_url, tmp_path, "calls", "today", "--date", day)
    assert "Dr. Anna Weber" in table and "Nr. 130" in table

    ics = tmp_path / "calls.ics"
    comms(committed_url, tmp_path, "calls", "ics", "--date", day, "-o", str(ics))
    calendar = icalendar.Calendar.from_ical(ics.read_bytes())
    [event] = calendar.walk("VEVENT")
    start = event.decoded("dtstart")
    assert start == call.scheduled_at
    assert str(start.tzinfo) == "Europe/Berlin"
    assert event.decoded("dtend") - start == dt.timedelta(minutes=5)
    assert calendar.walk("VTIMEZONE")
    assert "Depressive" not in ics.read_text() and "F32.1" not in ics.read_text()


def test_calls_outcome_sends_the_public_message(
    worker: WorkerProcess,
    committed_db: Engine,
    committed_url: str,
    worker_broker_url: str,
    tmp_path: Path,
) -> None:
    sent_email(14)
    follow_up_check()
    schedule_calls()
    [call] = calls_of(committed_db)
    env = worker_environment(
        COMMS_DATABASE_URL=committed_url,
        COMMS_BROKER_URL=worker_broker_url,
        COMMS_VAR_DIR=str(tmp_path),
    )
    bad = subprocess.run(
        [COMMS, "calls", "outcome", str(call.id), "--status", "finished"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: status: Input should be 'completed', 'failed' or 'cancelled'"
    ]
    subprocess.run(
        [COMMS, "calls", "outcome", str(call.id), "--status", "failed", "--notes", "AB"],
        env=env,
        check=True,
        capture_output=True,
    )
    wait_for(lambda: len(calls_of(committed_db)) == 2)
    first, retry = calls_of(committed_db)
    assert first.status is PhoneCallStatus.FAILED
    assert first.notes == "AB"
    assert retry.attempt == 2


def test_a_task_reads_only_the_calls_booked_since_its_last_chunk(committed_db: Engine) -> None:
    """Between two chunks of one task another worker books a call: the next chunk counts
    it, and counts the first chunk's own call once, not twice."""
    settings = get_settings()
    first, other = sent_email(201), sent_email(202)
    at = now()
    with transaction() as session:
        report = follow_up.schedule_follow_ups(session, [first.id], at, settings)
    assert report.scheduled == 1 and report.known is not None
    known = report.known
    [ours] = calls_of(committed_db)
    ours_end = ours.scheduled_at + dt.timedelta(minutes=ours.duration_minutes)
    with transaction() as session:  # another worker, with its own fresh read
        booking = scheduling.Booking.start(session, settings, at)
        therapist = session.get(Therapist, other.therapist_id)
        assert therapist is not None
        start = booking.find_slot(therapist)
        assert start is not None and start != ours.scheduled_at
        booking.book(therapist, start, [2020], dedup_key="test:other")
        booking.record()
    with transaction() as session:
        again = scheduling.read_calls(session, at, settings, known)
    assert again is known, "the index is extended, not read again"
    assert known.booked.load(ours.scheduled_at, ours_end) == 1
    assert known.booked.load(start, start + dt.timedelta(minutes=5)) == 1
    assert not known.booked.therapist_is_free(
        other.therapist_id, start, start + dt.timedelta(minutes=5)
    )
