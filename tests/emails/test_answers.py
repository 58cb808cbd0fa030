"""Therapists' answers: which email they answer, in which order they arrive, and when."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, select, update
from sqlalchemy.orm import Session

from comms_tasks.appliers import APPLIERS
from comms_tasks.calls.tasks import follow_up_check, schedule_calls
from comms_tasks.db import transaction
from comms_tasks.emails import delivery, send_results, weekly
from comms_tasks.inbound.dead_letter_replay import replay
from comms_tasks.inbound.inbox import handle
from comms_tasks.mail.sender import SendResult
from comms_tasks.models import (
    Email,
    EmailBatch,
    EmailStatus,
    EmailTemplate,
    OutboxEvent,
    PhoneCallStatus,
    ResponseOutcome,
)
from comms_tasks.models.base import utcnow
from comms_tasks.settings import get_settings
from comms_tasks.task_names import QUEUE_EMAIL, RECORD_EMAIL_RESPONSE
from tests import factories as f
from tests.calls.test_calls import MATCHING, THERAPIST, apply, calls_of, now, sent_email


def answer(
    email_id: int, received_at: dt.datetime, *outcomes: tuple[int, str], **fields: Any
) -> dict[str, Any]:
    return {
        "command_id": str(uuid.uuid4()),
        "email_id": email_id,
        "received_at": received_at.isoformat(),
        "content": fields.get("content", "Meine Antwort."),
        "outcomes": [
            {"placement_request_id": request_id, "outcome": outcome, "notes": None}
            for request_id, outcome in outcomes
        ],
    }


def reminder_of(original: Email, request_ids: list[int]) -> Email:
    """A ``follow_up`` asked for by command, threaded to ``original``, and sent."""
    queue = {
        "command_id": str(uuid.uuid4()),
        "therapist_id": original.therapist_id,
        "template": "follow_up",
        "placement_request_ids": request_ids,
        "reply_to_email_id": original.id,
    }
    assert apply(QUEUE_EMAIL, queue) == "applied"
    with transaction() as session:
        reminder = session.scalars(
            select(Email).where(Email.in_reply_to_email_id == original.id)
        ).one()
        reminder.status = EmailStatus.SENT
        reminder.sent_at = now()
        return reminder


def email_row(engine: Engine, email_id: int) -> Email:
    with Session(engine) as session:
        email = session.get(Email, email_id)
        assert email is not None
        _ = email.batches
        return email


def outcomes_of(engine: Engine, email_id: int) -> dict[int, ResponseOutcome | None]:
    with Session(engine) as session:
        return dict(
            session.execute(
                select(EmailBatch.placement_request_id, EmailBatch.response_outcome).where(
                    EmailBatch.email_id == email_id
                )
            ).all()
        )


def published_outcomes(engine: Engine) -> list[tuple[int, str]]:
    with Session(engine) as session:
        return [
            (row.envelope["payload"]["placement_request_id"], row.envelope["payload"]["outcome"])
            for row in session.scalars(
                select(OutboxEvent)
                .where(OutboxEvent.event_type == "placement_request.outcome_recorded")
                .order_by(OutboxEvent.id)
            )
        ]


# --- an answer to a reminder ---------------------------------------------------------------


def test_an_answer_to_the_reminder_cancels_the_originals_call(domain_db: Connection) -> None:
    original = sent_email(21)
    assert follow_up_check()["marked"] == 1
    assert schedule_calls()["scheduled"] == 1
    reminder = reminder_of(original, [210, 211])
    response = answer(reminder.id, now(), (210, "rejected"), (211, "rejected"))
    assert apply(RECORD_EMAIL_RESPONSE, response) == "applied"
    [call] = calls_of(domain_db)
    assert call.email_id == original.id
    assert call.status is PhoneCallStatus.CANCELLED
    # The original is answered too, for the requests the answer covers.
    assert email_row(domain_db, original.id).response_received
    assert outcomes_of(domain_db, original.id) == {
        210: ResponseOutcome.REJECTED,
        211: ResponseOutcome.REJECTED,
    }
    # Each outcome is published once, by the email that was answered.
    assert published_outcomes(domain_db) == [(210, "rejected"), (211, "rejected")]


def test_an_answered_reminder_keeps_its_original_from_a_call_later(domain_db: Connection) -> None:
    original = sent_email(22, days_ago=3)
    reminder = reminder_of(original, [220])
    assert apply(RECORD_EMAIL_RESPONSE, answer(reminder.id, now(), (220, "accepted"))) == "applied"
    # A week after the original: its call would be booked, had the answer not reached it.
    with transaction() as session:
        row = session.get(Email, original.id)
        assert row is not None
        row.sent_at = now() - dt.timedelta(days=8)
    assert follow_up_check()["marked"] == 0
    schedule_calls()
    assert calls_of(domain_db) == []
    assert outcomes_of(domain_db, original.id) == {220: ResponseOutcome.ACCEPTED, 221: None}
    with Session(domain_db) as session:
        templates = session.scalars(select(Email.template).order_by(Email.id)).all()
    assert templates.count(EmailTemplate.CONFIRMATION) == 1


# --- answers out of order -----------------------------------------------------------------


def test_an_older_answer_never_overwrites_a_newer_one(domain_db: Connection) -> None:
    email = sent_email(31)
    newer = now()
    first = answer(email.id, newer, (310, "accepted"), content="NEUER: Ich nehme sie.")
    assert apply(RECORD_EMAIL_RESPONSE, first) == "applied"
    # Recorded later (another path: the mailbox, an operator), received an hour earlier.
    older = answer(
        email.id,
        newer - dt.timedelta(hours=1),
        (310, "rejected"),
        (311, "rejected"),
        content="ÄLTER: Leider kein Platz.",
    )
    assert apply(RECORD_EMAIL_RESPONSE, older) == "applied"
    row = email_row(domain_db, email.id)
    assert row.response_date == newer
    assert row.response_content == "NEUER: Ich nehme sie."
    # The older answer only says what no newer one did.
    assert outcomes_of(domain_db, email.id) == {
        310: ResponseOutcome.ACCEPTED,
        311: ResponseOutcome.REJECTED,
    }
    assert published_outcomes(domain_db) == [(310, "accepted"), (311, "rejected")]
    # Between the two: newer than what request 311 holds, older than the email's answer.
    between = answer(email.id, newer - dt.timedelta(minutes=30), (311, "accepted"))
    assert apply(RECORD_EMAIL_RESPONSE, between) == "applied"
    assert outcomes_of(domain_db, email.id) == {
        310: ResponseOutcome.ACCEPTED,
        311: ResponseOutcome.ACCEPTED,
    }
    assert email_row(domain_db, email.id).response_content == "NEUER: Ich nehme sie."
    assert published_outcomes(domain_db)[-1] == (311, "accepted")
    with Session(domain_db) as session:
        confirmed = session.scalars(
            select(EmailBatch.placement_request_id)
            .join(Email, Email.id == EmailBatch.email_id)
            .where(Email.template == EmailTemplate.CONFIRMATION)
            .order_by(EmailBatch.placement_request_id)
        ).all()
    assert confirmed == [310, 311]


def test_an_answer_with_the_same_time_applies(domain_db: Connection) -> None:
    email = sent_email(32)
    received = now()
    assert apply(RECORD_EMAIL_RESPONSE, answer(email.id, received, (320, "accepted"))) == "applied"
    again = answer(email.id, received, (320, "rejected"), content="Korrektur")
    assert apply(RECORD_EMAIL_RESPONSE, again) == "applied"
    assert outcomes_of(domain_db, email.id)[320] is ResponseOutcome.REJECTED
    assert email_row(domain_db, email.id).response_content == "Korrektur"


# --- an answer to an email that was not sent ------------------------------------------------


def queued_email(therapist_id: int) -> Email:
    assert apply(THERAPIST, f.therapist_upserted(therapist_id)) == "applied"
    request_id = therapist_id * 10
    created = f.request_created(request_id, patient_id=request_id, therapist_id=therapist_id)
    assert apply(MATCHING, created) == "applied"
    with transaction() as session:
        [email_id] = weekly.batch_chunk(session, [therapist_id], now(), get_settings()).email_ids
        email = session.get(Email, email_id)
        assert email is not None
        return email


def test_an_answer_to_an_unsent_email_is_a_dead_letter_until_it_is_sent(
    domain_db: Connection,
) -> None:
    email = queued_email(41)
    response = answer(email.id, now(), (410, "accepted"))
    outcome = handle(RECORD_EMAIL_RESPONSE, response, APPLIERS[RECORD_EMAIL_RESPONSE])
    assert outcome.result == "dead_letter"
    assert outcome.reason == "command.email_id: the email was not sent (queued)"
    row = email_row(domain_db, email.id)
    assert row.status is EmailStatus.QUEUED
    assert not row.response_received
    assert outcomes_of(domain_db, email.id) == {410: None}
    assert published_outcomes(domain_db) == []
    # Once it is sent, the operator replays the answer and nothing was lost.
    with transaction() as session:
        sent = session.get(Email, email.id)
        assert sent is not None
        sent.status = EmailStatus.SENT
        sent.sent_at = now()
    assert outcome.dead_letter_id is not None
    assert replay(outcome.dead_letter_id, APPLIERS).result == "applied"
    assert email_row(domain_db, email.id).response_received
    assert outcomes_of(domain_db, email.id) == {410: ResponseOutcome.ACCEPTED}


def test_an_answer_to_a_cancelled_or_failed_email_is_a_dead_letter(domain_db: Connection) -> None:
    for therapist_id, status in ((42, EmailStatus.CANCELLED), (43, EmailStatus.FAILED)):
        email = queued_email(therapist_id)
        with transaction() as session:
            row = session.get(Email, email.id)
            assert row is not None
            row.status = status
        response = answer(email.id, now(), (therapist_id * 10, "rejected"))
        assert apply(RECORD_EMAIL_RESPONSE, response) == (
            f"dead_letter: command.email_id: the email was not sent ({status.value})"
        )
        assert not email_row(domain_db, email.id).response_received


# --- confirmations asked for by command -----------------------------------------------------


def confirm(therapist_id: int, *request_ids: int) -> str:
    return apply(
        QUEUE_EMAIL,
        {
            "command_id": str(uuid.uuid4()),
            "therapist_id": therapist_id,
            "template": "confirmation",
            "placement_request_ids": list(request_ids),
            "reply_to_email_id": None,
        },
    )


def confirmations_of(engine: Engine) -> list[tuple[str, list[int]]]:
    with Session(engine) as session:
        found = session.scalars(
            select(Email).where(Email.template == EmailTemplate.CONFIRMATION).order_by(Email.id)
        ).all()
        return [(e.dedup_key, [b.placement_request_id for b in e.batches]) for e in found]


def test_a_request_is_confirmed_once_whatever_command_asks(domain_db: Connection) -> None:
    email = sent_email(51)
    assert apply(RECORD_EMAIL_RESPONSE, answer(email.id, now(), (510, "accepted"))) == "applied"
    # A producer retrying with fresh command ids, then asking for both requests.
    assert confirm(51, 510) == "applied"
    assert confirm(51, 510) == "applied"
    assert confirm(51, 511) == "applied"
    assert confirm(51, 510, 511) == "applied"
    assert confirmations_of(domain_db) == [
        ("confirmation:510", [510]),
        ("confirmation:511", [511]),
    ]


def test_a_cancelled_request_is_not_confirmed(domain_db: Connection) -> None:
    sent_email(52)
    assert apply(MATCHING, f.request_cancelled(521, occurred_at=now())) == "applied"
    assert confirm(52, 520, 521) == (
        "dead_letter: command.placement_request_ids[1]: the request is cancelled"
    )
    assert confirmations_of(domain_db) == []


def ask_reminder(original_id: int, therapist_id: int, request_ids: list[int]) -> int:
    """A ``follow_up`` of ``original_id`` asked for by command; its id."""
    queue = {
        "command_id": str(uuid.uuid4()),
        "therapist_id": therapist_id,
        "template": "follow_up",
        "placement_request_ids": request_ids,
        "reply_to_email_id": original_id,
    }
    assert apply(QUEUE_EMAIL, queue) == "applied"
    with transaction() as session:
        return max(
            session.scalars(select(Email.id).where(Email.in_reply_to_email_id == original_id))
        )


def mark_sent(email_id: int, days_ago: float) -> None:
    with transaction() as session:
        session.execute(
            update(Email)
            .where(Email.id == email_id)
            .values(status=EmailStatus.SENT, sent_at=now() - dt.timedelta(days=days_ago))
        )


def claim(set_aside: dict[str, int] | None = None) -> list[int]:
    with transaction() as session:
        messages = delivery.prepare_batch(
            session, utcnow(), 100, get_settings(), set_aside=set_aside
        )
    return [message.email_id for message in messages]


def give_back(email_id: int) -> None:
    with transaction() as session:
        send_results.release(session, [email_id], utcnow())


def assert_voided(engine: Connection, reminder_id: int) -> None:
    reminder = email_row(engine, reminder_id)
    assert reminder.status is EmailStatus.CANCELLED
    assert reminder.error_message == "cancelled: the email it follows up was answered"


def test_an_answer_to_the_original_cancels_its_unsent_reminder(domain_db: Connection) -> None:
    original = sent_email(23)
    queue = {
        "command_id": str(uuid.uuid4()),
        "therapist_id": original.therapist_id,
        "template": "follow_up",
        "placement_request_ids": [230, 231],
        "reply_to_email_id": original.id,
    }
    assert apply(QUEUE_EMAIL, queue) == "applied"
    # The therapist answers the original before the reminder went out, deciding nothing yet.
    assert apply(RECORD_EMAIL_RESPONSE, answer(original.id, now())) == "applied"
    with Session(domain_db) as session:
        reminder = session.scalars(
            select(Email).where(Email.in_reply_to_email_id == original.id)
        ).one()
        assert reminder.status is EmailStatus.CANCELLED
        assert reminder.error_message == "cancelled: the email it follows up was answered"


@pytest.mark.parametrize("given_back", ["released", "to_retry"])
def test_a_reminder_on_its_way_when_the_answer_came_is_not_sent_once_given_back(
    domain_db: Connection, given_back: str
) -> None:
    original = sent_email(26)
    reminder_id = ask_reminder(original.id, original.therapist_id, [260, 261])
    assert claim() == [reminder_id]
    # The answer comes while the reminder is claimed: it may be on the wire, so it is left
    # to its send's result.
    assert apply(RECORD_EMAIL_RESPONSE, answer(original.id, now())) == "applied"
    assert email_row(domain_db, reminder_id).status is EmailStatus.SENDING
    # The send run gives it back unsent: it stops first, or the server said "try later".
    if given_back == "released":
        give_back(reminder_id)
    else:
        failure = SendResult(reminder_id, delivered=False, temporary=True, error="451 later")
        with transaction() as session:
            send_results.record_results(session, [(failure, utcnow())], random.Random(0))
        with transaction() as session:
            session.execute(
                update(Email).where(Email.id == reminder_id).values(next_attempt_at=utcnow())
            )
    set_aside: dict[str, int] = {}

    assert claim(set_aside) == []
    assert set_aside == {"cancelled": 1}
    assert_voided(domain_db, reminder_id)


def test_an_answer_dated_ahead_voids_no_reminder_asked_for_after_it(
    domain_db: Connection,
) -> None:
    original = sent_email(27)
    # The producer's clock is 10 minutes fast.
    assert apply(RECORD_EMAIL_RESPONSE, answer(original.id, now() + dt.timedelta(minutes=10))) == (
        "applied"
    )
    # Matching reads that answer, then asks for a reminder, knowing of it.
    reminder_id = ask_reminder(original.id, original.therapist_id, [270, 271])

    assert claim() == [reminder_id]


@pytest.mark.parametrize("on_its_way", [False, True])
@pytest.mark.parametrize("answered", ["original", "first_reminder"])
def test_a_reminder_of_a_reminder_is_not_sent_once_its_thread_is_answered(
    domain_db: Connection, answered: str, on_its_way: bool
) -> None:
    original = sent_email(28)
    first = ask_reminder(original.id, original.therapist_id, [280, 281])
    mark_sent(first, days_ago=2)
    second = ask_reminder(first, original.therapist_id, [280, 281])
    if on_its_way:
        # Claimed when the answer comes, given back unsent afterwards.
        assert claim() == [second]
    answered_id = original.id if answered == "original" else first
    assert apply(RECORD_EMAIL_RESPONSE, answer(answered_id, now())) == "applied"
    if on_its_way:
        give_back(second)
    set_aside: dict[str, int] = {}

    # Cancelled by the answer (a reminder of the answered email) or at the claim.
    assert claim(set_aside) == []
    assert set_aside == ({"cancelled": 1} if on_its_way or answered == "original" else {})
    assert_voided(domain_db, second)


def test_a_claim_of_reminders_loads_their_originals_in_one_statement(
    domain_db: Connection,
) -> None:
    for therapist_id in (31, 32, 33, 34, 35):
        original = sent_email(therapist_id)
        ask_reminder(original.id, therapist_id, [therapist_id * 10, therapist_id * 10 + 1])
    statements: list[str] = []

    def seen(_connection: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(domain_db, "before_cursor_execute", seen)
    try:
        assert len(claim()) == 5
    finally:
        event.remove(domain_db, "before_cursor_execute", seen)
    one_by_one = [s for s in statements if s.endswith(f"WHERE {Email.__table__}.id = %(pk_1)s")]
    assert one_by_one == []


def test_a_late_older_answer_leaves_a_reminder_asked_for_after_the_newer_one(
    domain_db: Connection,
) -> None:
    original = sent_email(24)
    answered_at = now()
    assert apply(RECORD_EMAIL_RESPONSE, answer(original.id, answered_at)) == "applied"
    # Matching reads that answer and asks for a reminder: it knows of the answer.
    queue = {
        "command_id": str(uuid.uuid4()),
        "therapist_id": original.therapist_id,
        "template": "follow_up",
        "placement_request_ids": [240, 241],
        "reply_to_email_id": original.id,
    }
    assert apply(QUEUE_EMAIL, queue) == "applied"
    # An older copy of an answer arrives late, and a producer re-sends the first one.
    older = answer(original.id, answered_at - dt.timedelta(hours=1))
    assert apply(RECORD_EMAIL_RESPONSE, older) == "applied"
    assert apply(RECORD_EMAIL_RESPONSE, answer(original.id, answered_at)) == "applied"

    with Session(domain_db) as session:
        reminder = session.scalars(
            select(Email).where(Email.in_reply_to_email_id == original.id)
        ).one()
        assert reminder.status is EmailStatus.QUEUED


def test_a_reminder_of_an_email_that_never_went_out_is_a_dead_letter(
    domain_db: Connection,
) -> None:
    original = sent_email(25)
    with transaction() as session:
        row = session.get(Email, original.id)
        assert row is not None
        row.status = EmailStatus.FAILED
        row.sent_at = None
    queue = {
        "command_id": str(uuid.uuid4()),
        "therapist_id": original.therapist_id,
        "template": "follow_up",
        "placement_request_ids": [250, 251],
        "reply_to_email_id": original.id,
    }
    assert apply(QUEUE_EMAIL, queue) == (
        "dead_letter: command.reply_to_email_id: the email was not sent (failed)"
    )
    with Session(domain_db) as session:
        assert (
            session.scalars(select(Email).where(Email.in_reply_to_email_id == original.id)).all()
            == []
        )
