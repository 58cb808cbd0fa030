"""The email pipeline on real PostgreSQL and a real SMTP server on loopback.

Batching, sending, retries and answers run in this process with their real database
transactions (the committed test database); the two-worker test runs real workers.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from comms_tasks.appliers import APPLIERS
from comms_tasks.db import transaction
from comms_tasks.emails import delivery, weekly
from comms_tasks.emails.tasks import batch_requests, send_email
from comms_tasks.inbound.inbox import handle
from comms_tasks.models import (
    DeadLetter,
    Email,
    EmailStatus,
    EmailTemplate,
    OutboxEvent,
    PlacementRequest,
    PlacementRequestStatus,
    Therapist,
)
from comms_tasks.projections.tasks import APPLIERS as EVENT_APPLIERS
from comms_tasks.settings import get_settings
from comms_tasks.task_names import QUEUE_EMAIL, RECORD_EMAIL_RESPONSE
from tests import factories as f
from tests.smtp import SmtpSink

THERAPIST = "comms.handle_therapist_event"
MATCHING = "comms.handle_matching_event"
# In the past, so that what it queues is due now.
T0 = dt.datetime(2026, 11, 23, 6, 30, tzinfo=dt.UTC)
HTML_COMPLAINT = "<script>alert(1)</script> & Grübeln"


@pytest.fixture
def smtp(committed_db: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    monkeypatch.setenv("COMMS_MAIL_BACKEND", "smtp")
    monkeypatch.setenv("COMMS_SMTP_HOST", sink.host)
    monkeypatch.setenv("COMMS_SMTP_PORT", str(sink.port))
    monkeypatch.setenv("COMMS_SMTP_SECURITY", "none")
    monkeypatch.setenv("COMMS_SMTP_TIMEOUT", "2")
    monkeypatch.setenv("COMMS_SENDER_NAME", "Therapievermittlung Süd")
    monkeypatch.setenv("COMMS_REPLY_TO", "antworten@therapievermittlung.example")
    get_settings.cache_clear()
    yield sink
    sink.stop()
    get_settings.cache_clear()


def apply(task: str, event: dict[str, Any]) -> None:
    outcome = handle(task, event, EVENT_APPLIERS[task])
    assert outcome.result == "applied", outcome


def therapist(therapist_id: int, **overrides: Any) -> None:
    apply(THERAPIST, f.therapist_upserted(therapist_id, **overrides))


def open_requests(therapist_id: int, ids: range, **summary: Any) -> None:
    for request_id in ids:
        apply(
            MATCHING,
            f.request_created(
                request_id,
                patient_id=10_000 + request_id,
                therapist_id=therapist_id,
                created_at=T0 - dt.timedelta(days=30) + dt.timedelta(minutes=request_id),
                registered_on=f"2026-09-{request_id % 28 + 1:02d}",
                **summary,
            ),
        )


def run_batch(now: dt.datetime) -> weekly.BatchReport:
    with transaction() as session:
        candidates = weekly.batch_candidates(session)
    with transaction() as session:
        return weekly.batch_chunk(session, candidates, now, get_settings())


def all_emails(engine: Engine) -> list[Email]:
    with Session(engine) as session:
        found = session.scalars(select(Email).order_by(Email.id)).all()
        for item in found:
            _ = item.batches
        return list(found)


def mark_sent(engine: Engine, email_id: int, at: dt.datetime) -> None:
    with Session(engine) as session, session.begin():
        row = session.get(Email, email_id)
        assert row is not None
        row.status = EmailStatus.SENT
        row.sent_at = at


def events_of(engine: Engine, event_type: str) -> list[dict[str, Any]]:
    with Session(engine) as session:
        return [
            row.envelope
            for row in session.scalars(
                select(OutboxEvent).where(OutboxEvent.event_type == event_type)
            )
        ]


# --- batching ---------------------------------------------------------------------------


def test_six_requests_make_five_now_and_the_sixth_a_week_later(committed_db: Engine) -> None:
    therapist(1)
    open_requests(1, range(1, 7))
    assert run_batch(T0).emails_queued == 1
    [first] = all_emails(committed_db)
    assert first.template is EmailTemplate.BATCH_REQUEST
    assert first.subject == "Anfrage für 5 Therapieplätze"
    asked = [b.placement_request_id for b in sorted(first.batches, key=lambda b: b.priority)]
    assert len(asked) == 5
    assert [b.priority for b in sorted(first.batches, key=lambda b: b.priority)] == [1, 2, 3, 4, 5]

    # Queued and not yet sent: it counts as this week's email.
    assert run_batch(T0 + dt.timedelta(days=1)).emails_queued == 0
    mark_sent(committed_db, first.id, T0 + dt.timedelta(days=1))
    assert run_batch(T0 + dt.timedelta(days=7)).emails_queued == 0
    assert run_batch(T0 + dt.timedelta(days=8, minutes=1)).emails_queued == 1
    second = all_emails(committed_db)[1]
    assert second.template is EmailTemplate.INITIAL_CONTACT
    assert second.subject == "Anfrage für einen Therapieplatz"
    [sixth] = [b.placement_request_id for b in second.batches]
    assert sixth not in asked
    assert [e["payload"]["email_id"] for e in events_of(committed_db, "email.queued")] == [
        first.id,
        second.id,
    ]


def test_requests_are_asked_oldest_registration_first(committed_db: Engine) -> None:
    therapist(2)
    for request_id, registered in [(21, "2026-10-01"), (22, None), (23, "2026-08-01")]:
        apply(
            MATCHING,
            f.request_created(
                request_id, patient_id=request_id, therapist_id=2, registered_on=registered
            ),
        )
    run_batch(T0)
    [queued] = all_emails(committed_db)
    order = [b.placement_request_id for b in sorted(queued.batches, key=lambda b: b.priority)]
    assert order == [23, 21, 22]


def test_blocked_inactive_and_addressless_therapists_are_never_contacted(
    committed_db: Engine,
) -> None:
    therapist(3, status="blocked")
    therapist(4, status="inactive")
    therapist(5, email=None)
    for therapist_id in (3, 4, 5):
        open_requests(therapist_id, range(therapist_id * 100, therapist_id * 100 + 2))
    assert run_batch(T0).emails_queued == 0
    assert all_emails(committed_db) == []


def test_the_batch_task_runs_twice_and_queues_once(committed_db: Engine) -> None:
    therapist(6)
    open_requests(6, range(60, 63))
    first = batch_requests()
    second = batch_requests()
    assert first["emails_queued"] == 1
    assert second["emails_queued"] == 0
    assert len(all_emails(committed_db)) == 1


def test_two_concurrent_runs_on_postgres_queue_one_email_per_therapist(
    committed_db: Engine,
) -> None:
    therapist_ids = range(100, 140)
    for therapist_id in therapist_ids:
        therapist(therapist_id)
        open_requests(therapist_id, range(therapist_id * 10, therapist_id * 10 + 2))
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with transaction() as session:
                candidates = weekly.batch_candidates(session)
            barrier.wait()
            with transaction() as session:
                weekly.batch_chunk(session, candidates, T0, get_settings())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a run hung"
    assert errors == []
    with Session(committed_db) as session:
        per_therapist = session.execute(
            select(Email.therapist_id, func.count()).group_by(Email.therapist_id)
        ).all()
    assert sorted(per_therapist) == [(therapist_id, 1) for therapist_id in therapist_ids]


# --- sending ------------------------------------------------------------------------------


def queue_one(committed_db: Engine, therapist_id: int = 7, **summary: Any) -> Email:
    therapist(therapist_id, last_name="Weiß", first_name="Jürgen", salutation="Herr")
    open_requests(therapist_id, range(therapist_id * 10, therapist_id * 10 + 2), **summary)
    run_batch(T0)
    return all_emails(committed_db)[-1]


def test_a_sent_email_parses_back_exactly(committed_db: Engine, smtp: SmtpSink) -> None:
    queued = queue_one(committed_db, current_complaints=HTML_COMPLAINT)
    assert send_email() == {"sent": 1}
    [message] = smtp.accepted
    assert message["Message-ID"] == queued.message_id
    assert str(message["Subject"]) == "Anfrage für 2 Therapieplätze"
    assert message["From"].addresses[0].display_name == "Therapievermittlung Süd"
    assert message["To"].addresses[0].display_name == "Dr. Jürgen Weiß"
    assert message["Reply-To"].addresses[0].addr_spec == "antworten@therapievermittlung.example"
    assert message["Date"] is not None
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    assert HTML_COMPLAINT in text.get_content()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Grübeln" in html.get_content()
    assert "<script>" not in html.get_content()
    [row] = all_emails(committed_db)
    assert row.status is EmailStatus.SENT
    assert row.sent_at is not None
    [sent_event] = events_of(committed_db, "email.sent")
    assert sent_event["payload"]["message_id"] == queued.message_id


def test_451_then_250_is_sent_with_the_retry_counted(committed_db: Engine, smtp: SmtpSink) -> None:
    queued = queue_one(committed_db)
    smtp.script("451 4.3.0 Try again later")
    assert send_email() == {"queued": 1}
    [waiting] = all_emails(committed_db)
    assert waiting.status is EmailStatus.QUEUED
    assert waiting.retry_count == 1
    assert waiting.error_message is not None and "451" in waiting.error_message
    assert waiting.next_attempt_at is not None and waiting.queued_at is not None
    delay = waiting.next_attempt_at - dt.datetime.now(dt.UTC)
    assert dt.timedelta(seconds=30) < delay <= dt.timedelta(seconds=72)
    # Not due yet: the every-minute send leaves it; an immediate send of it does not.
    assert send_email() == {}
    assert send_email(queued.id) == {"sent": 1}
    [sent] = all_emails(committed_db)
    assert sent.status is EmailStatus.SENT
    assert sent.retry_count == 1
    assert smtp.message_ids() == {queued.message_id: 1}


def test_550_fails_at_once_with_the_servers_reply(committed_db: Engine, smtp: SmtpSink) -> None:
    queue_one(committed_db)
    smtp.script("550 5.1.1 mailbox unavailable")
    assert send_email() == {"failed": 1}
    [failed] = all_emails(committed_db)
    assert failed.status is EmailStatus.FAILED
    assert failed.error_message is not None
    assert "550" in failed.error_message and "mailbox unavailable" in failed.error_message
    [event] = events_of(committed_db, "email.failed")
    assert event["payload"]["email_id"] == failed.id
    assert smtp.accepted == []


@pytest.mark.parametrize("fault", ["drop", "hang"])
def test_a_dropped_or_silent_connection_is_retried_later(
    committed_db: Engine, smtp: SmtpSink, fault: str
) -> None:
    queued = queue_one(committed_db)
    smtp.script(fault)
    assert send_email() == {"queued": 1}
    [waiting] = all_emails(committed_db)
    assert waiting.retry_count == 1
    assert waiting.message_id == queued.message_id
    assert send_email(queued.id) == {"sent": 1}
    assert smtp.message_ids() == {queued.message_id: 1}


def test_eight_temporary_failures_end_in_failed(committed_db: Engine, smtp: SmtpSink) -> None:
    queued = queue_one(committed_db)
    smtp.script(*["451 4.3.0 Try again later"] * delivery.MAX_ATTEMPTS)
    for attempt in range(1, delivery.MAX_ATTEMPTS + 1):
        result = send_email(queued.id)
        assert result == ({"failed": 1} if attempt == delivery.MAX_ATTEMPTS else {"queued": 1})
    [failed] = all_emails(committed_db)
    assert failed.status is EmailStatus.FAILED
    assert failed.retry_count == delivery.MAX_ATTEMPTS


def test_retry_delays_double_up_to_an_hour_with_jitter() -> None:
    rng = random.Random(1)
    for attempt, minutes in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (8, 60)]:
        delay = delivery.retry_delay(attempt, rng)
        assert dt.timedelta(minutes=minutes) * 0.8 <= delay <= dt.timedelta(minutes=minutes) * 1.2
        assert delay <= delivery.MAX_RETRY_DELAY


def test_an_expired_sending_lease_is_claimed_again(committed_db: Engine, smtp: SmtpSink) -> None:
    queued = queue_one(committed_db)
    with Session(committed_db) as session, session.begin():
        row = session.get(Email, queued.id)
        assert row is not None
        row.status = EmailStatus.SENDING
        row.lease_expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    assert send_email() == {"sent": 1}


def withdraw(committed_db: Engine, request_id: int) -> None:
    with Session(committed_db) as session, session.begin():
        request = session.get(PlacementRequest, request_id)
        assert request is not None
        request.status = PlacementRequestStatus.CANCELLED


def test_withdrawn_requests_are_dropped_before_sending(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    queued = queue_one(committed_db)
    first, second = sorted(queued.batches, key=lambda b: b.priority)
    withdraw(committed_db, first.placement_request_id)
    assert send_email() == {"sent": 1}
    [sent] = all_emails(committed_db)
    assert sent.template is EmailTemplate.INITIAL_CONTACT
    assert sent.subject == "Anfrage für einen Therapieplatz"
    body = smtp.accepted[0].get_body(("plain",))
    assert body is not None
    assert f"Nr. {second.placement_request_id}" in body.get_content()
    assert f"Nr. {first.placement_request_id}" not in body.get_content()
    assert [b.included for b in sorted(sent.batches, key=lambda b: b.priority)] == [False, True]


def test_an_email_with_every_request_withdrawn_is_cancelled(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    queued = queue_one(committed_db)
    for batch in queued.batches:
        withdraw(committed_db, batch.placement_request_id)
    send_email()
    [cancelled] = all_emails(committed_db)
    assert cancelled.status is EmailStatus.CANCELLED
    assert smtp.accepted == []


# --- answers and commands -------------------------------------------------------------


def command(**fields: Any) -> dict[str, Any]:
    return {"command_id": str(f.uuid.uuid4()), **fields}


def test_an_accepted_request_queues_a_confirmation_at_once(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    queued = queue_one(committed_db)
    send_email()
    accepted, rejected = sorted(queued.batches, key=lambda b: b.priority)
    response = command(
        email_id=queued.id,
        received_at="2026-12-01T10:00:00+01:00",
        content="Gern nehme ich die erste Anfrage an.",
        outcomes=[
            {
                "placement_request_id": accepted.placement_request_id,
                "outcome": "accepted",
                "notes": None,
            },
            {
                "placement_request_id": rejected.placement_request_id,
                "outcome": "rejected",
                "notes": "keine Kapazität",
            },
        ],
    )
    outcome = handle(RECORD_EMAIL_RESPONSE, response, APPLIERS[RECORD_EMAIL_RESPONSE])
    assert outcome.result == "applied"
    answered, confirmation = all_emails(committed_db)
    assert answered.response_received
    assert answered.response_content == "Gern nehme ich die erste Anfrage an."
    assert confirmation.template is EmailTemplate.CONFIRMATION
    assert [b.placement_request_id for b in confirmation.batches] == [accepted.placement_request_id]
    # Outside the weekly limit: it goes out although an email was sent today.
    assert send_email() == {"sent": 1}
    reply = smtp.accepted[-1]
    assert reply["In-Reply-To"] == queued.message_id
    outcomes = events_of(committed_db, "placement_request.outcome_recorded")
    assert {(e["payload"]["placement_request_id"], e["payload"]["outcome"]) for e in outcomes} == {
        (accepted.placement_request_id, "accepted"),
        (rejected.placement_request_id, "rejected"),
    }
    assert len(events_of(committed_db, "email.response_recorded")) == 1
    # The same command again changes nothing.
    again = handle(RECORD_EMAIL_RESPONSE, response, APPLIERS[RECORD_EMAIL_RESPONSE])
    assert again.result == "duplicate"
    assert len(all_emails(committed_db)) == 2


def test_a_response_for_an_unknown_email_is_a_dead_letter(committed_db: Engine) -> None:
    response = command(
        email_id=999_999, received_at="2026-12-01T10:00:00+01:00", content=None, outcomes=[]
    )
    outcome = handle(RECORD_EMAIL_RESPONSE, response, APPLIERS[RECORD_EMAIL_RESPONSE])
    assert outcome.result == "dead_letter"
    assert outcome.reason == "command.email_id: unknown email"
    with Session(committed_db) as session:
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 1


def test_a_follow_up_command_is_threaded_to_the_original(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    original = queue_one(committed_db)
    send_email()
    # Sent the day before: a reminder the same day would wait for the next day.
    mark_sent(committed_db, original.id, dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    request_ids = [b.placement_request_id for b in original.batches]
    queue = command(
        therapist_id=original.therapist_id,
        template="follow_up",
        placement_request_ids=request_ids,
        reply_to_email_id=original.id,
    )
    assert handle(QUEUE_EMAIL, queue, APPLIERS[QUEUE_EMAIL]).result == "applied"
    assert send_email() == {"sent": 1}
    follow_up = smtp.accepted[-1]
    assert follow_up["In-Reply-To"] == original.message_id
    assert original.message_id in follow_up["References"]
    with Session(committed_db) as session:
        stored = session.scalars(
            select(Email).where(Email.template == EmailTemplate.FOLLOW_UP)
        ).one()
        assert stored.in_reply_to_email_id == original.id
        assert session.get(Therapist, original.therapist_id) is not None
