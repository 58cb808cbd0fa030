"""What sending checks again just before an email goes out, on PostgreSQL and a real SMTP server.

- The therapist: still active, not deleted, with an address; an email to one who is not
  any more is cancelled, whatever its template, and one whose address or name changed
  goes to the current address with the current greeting.
- The day: no therapist gets two emails on one local day (confirmations aside); the
  second waits for the next day, without counting as a failed attempt.

Both are read for a whole claim at once, never per email.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session

from comms_tasks.appliers import APPLIERS
from comms_tasks.db import get_engine, transaction
from comms_tasks.emails import delivery, weekly
from comms_tasks.emails.tasks import send_email
from comms_tasks.inbound.inbox import handle
from comms_tasks.models import Email, EmailStatus, EmailTemplate, OutboxEvent, Therapist
from comms_tasks.models.base import utcnow
from comms_tasks.settings import get_settings
from comms_tasks.task_names import QUEUE_EMAIL
from schedules import BATCH_TIME
from tests import factories as f
from tests.emails.test_email_pipeline import (
    THERAPIST,
    apply,
    command,
    open_requests,
    queue_one,
    therapist,
)
from tests.smtp import SmtpSink


def load(engine: Engine, email_id: int) -> Email:
    with Session(engine) as session:
        email = session.get(Email, email_id)
        assert email is not None
        _ = email.batches
        return email


def change(engine: Engine, email_id: int, **values: Any) -> None:
    with Session(engine) as session, session.begin():
        session.execute(update(Email).where(Email.id == email_id).values(**values))


def queue_command_email(original: Email, template: str, *, threaded: bool = True) -> Email:
    """A ``comms.queue_email`` for the original's requests, threaded to it (once it was sent)."""
    request_ids = [batch.placement_request_id for batch in original.batches][:1]
    message = command(
        therapist_id=original.therapist_id,
        template=template,
        placement_request_ids=request_ids,
        reply_to_email_id=original.id if threaded else None,
    )
    assert handle(QUEUE_EMAIL, message, APPLIERS[QUEUE_EMAIL]).result == "applied"
    return all_emails_of(original.therapist_id)[-1]


def all_emails_of(therapist_id: int) -> list[Email]:
    with transaction() as session:
        found = session.scalars(
            select(Email).where(Email.therapist_id == therapist_id).order_by(Email.id)
        ).all()
        for item in found:
            _ = item.batches
        session.expunge_all()
        return list(found)


def failed_events(engine: Engine) -> int:
    with Session(engine) as session:
        rows = session.scalars(
            select(OutboxEvent).where(OutboxEvent.event_type == "email.failed")
        ).all()
        return len(rows)


def sent_before_today(engine: Engine, email_id: int) -> None:
    """The email went out yesterday (local), so today is a new day for its therapist."""
    change(
        engine,
        email_id,
        status=EmailStatus.SENT,
        sent_at=utcnow() - dt.timedelta(days=1),
        next_attempt_at=None,
    )


# --- the therapist --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change_to", "reason"),
    [
        ({"status": "blocked"}, "cancelled: the therapist is blocked"),
        ({"status": "inactive"}, "cancelled: the therapist is inactive"),
        ({"email": None}, "cancelled: the therapist has no email address"),
        (None, "cancelled: the therapist was deleted"),
    ],
)
def test_a_reminder_to_a_therapist_no_longer_contactable_is_cancelled(
    committed_db: Engine, smtp: SmtpSink, change_to: dict[str, Any] | None, reason: str
) -> None:
    original = queue_one(committed_db)
    assert send_email() == {"sent": 1}
    sent_before_today(committed_db, original.id)
    reminder = queue_command_email(original, "follow_up")
    later = f.at(24 * 60)
    if change_to is None:
        apply(THERAPIST, f.therapist_deleted(original.therapist_id, occurred_at=later))
    else:
        apply(
            THERAPIST,
            f.therapist_upserted(
                original.therapist_id,
                occurred_at=later,
                last_name="Weiß",
                first_name="Jürgen",
                salutation="Herr",
                **change_to,
            ),
        )

    assert send_email() == {"cancelled": 1}
    cancelled = load(committed_db, reminder.id)
    assert cancelled.status is EmailStatus.CANCELLED
    assert cancelled.error_message == reason
    assert cancelled.lease_expires_at is None and cancelled.next_attempt_at is None
    assert cancelled.retry_count == 0
    assert len(smtp.accepted) == 1  # the original only
    assert failed_events(committed_db) == 0


def test_a_confirmation_to_a_blocked_therapist_is_cancelled_too(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    original = queue_one(committed_db)
    # Not threaded: a thread needs an email that went out, and this one is still queued.
    confirmation = queue_command_email(original, "confirmation", threaded=False)
    apply(
        THERAPIST,
        f.therapist_upserted(original.therapist_id, occurred_at=f.at(60), status="blocked"),
    )
    assert send_email() == {"cancelled": 2}
    assert load(committed_db, confirmation.id).status is EmailStatus.CANCELLED
    assert load(committed_db, original.id).status is EmailStatus.CANCELLED
    assert smtp.accepted == []


def test_an_email_goes_to_the_therapists_current_address_and_name(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    queued = queue_one(committed_db)
    assert queued.recipient_email == "praxis7@weber-therapie.de"
    apply(
        THERAPIST,
        f.therapist_upserted(
            queued.therapist_id,
            occurred_at=f.at(60),
            salutation="Frau",
            title="Prof. Dr.",
            first_name="Jana",
            last_name="Weiß-Berger",
            email="neu@praxis-weiss.de",
        ),
    )
    assert send_email() == {"sent": 1}
    [message] = smtp.accepted
    assert message["To"].addresses[0].addr_spec == "neu@praxis-weiss.de"
    assert message["To"].addresses[0].display_name == "Prof. Dr. Jana Weiß-Berger"
    assert smtp.envelopes[0][1] == ["neu@praxis-weiss.de"]
    text = message.get_body(("plain",))
    assert text is not None
    assert text.get_content().startswith("Sehr geehrte Frau Prof. Dr. Weiß-Berger,")
    sent = load(committed_db, queued.id)
    assert sent.recipient_email == "neu@praxis-weiss.de"
    assert sent.recipient_name == "Prof. Dr. Jana Weiß-Berger"
    assert sent.message_id == queued.message_id
    assert sent.body_text.startswith("Sehr geehrte Frau Prof. Dr. Weiß-Berger,")


def test_a_changed_salutation_alone_renders_the_greeting_again(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    queued = queue_one(committed_db)
    assert queued.body_text.startswith("Sehr geehrter Herr Dr. Weiß,")
    apply(
        THERAPIST,
        f.therapist_upserted(
            queued.therapist_id,
            occurred_at=f.at(60),
            salutation=None,
            first_name="Jürgen",
            last_name="Weiß",
        ),
    )
    assert send_email() == {"sent": 1}
    assert load(committed_db, queued.id).body_text.startswith("Guten Tag Dr. Jürgen Weiß,")


@pytest.fixture
def statements(committed_db: Engine) -> Iterator[list[str]]:
    """Every statement the process sends to the committed database, while the test runs."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(args[2])

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def prepare_statements(statements: list[str]) -> int:
    statements.clear()
    with transaction() as session:
        delivery.prepare_batch(session, utcnow(), 1000, get_settings())
    return len(statements)


def test_a_claim_checks_its_therapists_in_the_same_queries_for_two_emails_or_twenty(
    committed_db: Engine, statements: list[str]
) -> None:
    def queue(first: int, count: int) -> None:
        for therapist_id in range(first, first + count):
            therapist(therapist_id)
            open_requests(therapist_id, range(therapist_id * 10, therapist_id * 10 + 2))
        with transaction() as session:
            weekly.batch_chunk(session, list(range(first, first + count)), utcnow(), get_settings())
        # A quarter of them blocked, a quarter with a new address (rendered again).
        for therapist_id in range(first, first + count, 4):
            therapist(therapist_id, status="blocked")
        for therapist_id in range(first + 1, first + count, 4):
            therapist(therapist_id, email=f"neu{therapist_id}@example.org")

    queue(1000, 4)
    few = prepare_statements(statements)
    queue(2000, 20)
    many = prepare_statements(statements)
    assert few == many, "\n".join(statements)
    with transaction() as session:
        statuses = session.execute(
            select(Email.therapist_id, Email.status, Email.recipient_email)
        ).all()
    blocked = {row.status for row in statuses if (row.therapist_id % 1000) % 4 == 0}
    assert blocked == {EmailStatus.CANCELLED}
    moved = {row.recipient_email for row in statuses if row.therapist_id in (1001, 2005)}
    assert moved == {"neu1001@example.org", "neu2005@example.org"}


# --- one email a day ------------------------------------------------------------------


def next_batch_time(now: dt.datetime) -> dt.datetime:
    zone = get_settings().zone
    tomorrow = now.astimezone(zone).date() + dt.timedelta(days=1)
    return dt.datetime.combine(tomorrow, dt.time(**BATCH_TIME), tzinfo=zone).astimezone(dt.UTC)


def test_a_reminder_the_day_of_another_email_waits_for_the_next_day(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    original = queue_one(committed_db)
    assert send_email() == {"sent": 1}
    # The original went out today (after its retries); a reminder is queued the same day.
    change(committed_db, original.id, retry_count=3)
    reminder = queue_command_email(original, "follow_up")

    started = utcnow()
    assert send_email() == {"held": 1}
    waiting = load(committed_db, reminder.id)
    assert waiting.status is EmailStatus.QUEUED
    assert waiting.retry_count == 0
    assert waiting.lease_expires_at is None
    assert waiting.next_attempt_at == next_batch_time(started)
    assert len(smtp.accepted) == 1
    assert failed_events(committed_db) == 0
    # Not due before then, even for a beat that runs every minute.
    assert send_email() == {}

    # The next day: it goes out.
    sent_before_today(committed_db, original.id)
    assert send_email(reminder.id) == {"sent": 1}
    assert load(committed_db, reminder.id).retry_count == 0
    assert [m["Message-ID"] for m in smtp.accepted] == [original.message_id, reminder.message_id]


def test_two_emails_due_together_send_one_and_the_confirmation(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    original = queue_one(committed_db)
    assert send_email() == {"sent": 1}
    sent_before_today(committed_db, original.id)
    reminder = queue_command_email(original, "follow_up")
    second_reminder = queue_command_email(original, "follow_up")
    confirmation = queue_command_email(original, "confirmation")

    assert send_email() == {"sent": 2, "held": 1}
    assert load(committed_db, reminder.id).status is EmailStatus.SENT
    assert load(committed_db, confirmation.id).status is EmailStatus.SENT
    held = load(committed_db, second_reminder.id)
    assert held.status is EmailStatus.QUEUED
    assert held.retry_count == 0
    assert held.next_attempt_at is not None and held.next_attempt_at > utcnow()


def test_an_email_another_worker_is_sending_holds_the_second_for_the_day(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    original = queue_one(committed_db)
    assert send_email() == {"sent": 1}
    sent_before_today(committed_db, original.id)
    in_flight = queue_command_email(original, "follow_up")
    change(
        committed_db,
        in_flight.id,
        status=EmailStatus.SENDING,
        lease_expires_at=utcnow() + dt.timedelta(minutes=5),
    )
    second = queue_command_email(original, "follow_up")
    assert send_email() == {"held": 1}
    assert load(committed_db, second.id).status is EmailStatus.QUEUED
    assert load(committed_db, second.id).next_attempt_at == next_batch_time(utcnow())
    assert len(smtp.accepted) == 1


def test_a_confirmation_goes_out_the_day_of_another_email(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    original = queue_one(committed_db)
    assert send_email() == {"sent": 1}
    confirmation = queue_command_email(original, "confirmation")
    assert send_email() == {"sent": 1}
    assert load(committed_db, confirmation.id).template is EmailTemplate.CONFIRMATION


def test_a_claim_of_only_held_emails_does_not_end_the_run(
    committed_db: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = queue_one(committed_db)
    assert send_email() == {"sent": 1}
    held = [queue_command_email(original, "follow_up") for _ in range(2)]
    other = queue_one(committed_db, therapist_id=8)
    change(committed_db, other.id, next_attempt_at=utcnow())  # due after the reminders
    monkeypatch.setattr("comms_tasks.emails.tasks.EMAILS_PER_CLAIM", 2)

    # The first claim holds both reminders; the run goes on to the next claim.
    assert send_email() == {"held": 2, "sent": 1}
    assert smtp.message_ids()[other.message_id] == 1
    assert {load(committed_db, email.id).status for email in held} == {EmailStatus.QUEUED}


def test_two_claims_at_once_send_one_of_a_therapists_two_emails(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    original = queue_one(committed_db)
    assert send_email() == {"sent": 1}
    sent_before_today(committed_db, original.id)
    reminders = [queue_command_email(original, "follow_up") for _ in range(2)]
    settings = get_settings()
    second: list[list[Any]] = []

    def second_claim() -> None:
        with transaction() as session:
            second.append(delivery.prepare_batch(session, utcnow(), 1, settings))

    # The first claim is still open (not committed) while the second one runs.
    with transaction() as session:
        first = delivery.prepare_batch(session, utcnow(), 1, settings)
        other = threading.Thread(target=second_claim)
        other.start()
        other.join(timeout=1)
    other.join(timeout=30)
    assert not other.is_alive()
    assert [m.email_id for m in first] == [reminders[0].id]
    assert second == [[]]
    assert load(committed_db, reminders[1].id).status is EmailStatus.QUEUED


def flag_bounced(
    engine: Engine, original: Email, address: str, new_address: str | None = None
) -> None:
    """The therapist's address flagged as a permanent bounce would (and maybe replaced)."""
    with Session(engine) as session, session.begin():
        therapist = session.get(Therapist, original.therapist_id)
        assert therapist is not None
        therapist.undeliverable_email = address
        therapist.undeliverable_since = utcnow()
        therapist.undeliverable_status = "5.1.1"
        if new_address is not None:
            therapist.email = new_address


def test_a_reminder_to_an_address_that_bounced_for_good_is_cancelled(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    original = queue_one(committed_db)
    assert send_email() == {"sent": 1}
    sent_before_today(committed_db, original.id)
    reminder = queue_command_email(original, "follow_up")
    # Flagged in another spelling: addresses compare without case.
    flag_bounced(committed_db, original, original.recipient_email.upper())

    assert send_email() == {"cancelled": 1}
    cancelled = load(committed_db, reminder.id)
    assert cancelled.status is EmailStatus.CANCELLED
    assert cancelled.error_message == "cancelled: the therapist's address bounced for good"
    assert len(smtp.accepted) == 1


def test_a_new_address_lifts_the_bounce_flag(committed_db: Engine, smtp: SmtpSink) -> None:
    original = queue_one(committed_db)
    assert send_email() == {"sent": 1}
    sent_before_today(committed_db, original.id)
    reminder = queue_command_email(original, "follow_up")
    flag_bounced(committed_db, original, original.recipient_email, new_address="neu@praxis.example")

    assert send_email() == {"sent": 1}
    assert load(committed_db, reminder.id).recipient_email == "neu@praxis.example"
