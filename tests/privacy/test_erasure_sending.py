"""``patient.erased`` and the emails still to be sent, on PostgreSQL and a real SMTP server.

An unsent email of any template drops the erased patient (rendered again for the others)
or is cancelled when no one is left. An email already claimed by a worker (``sending``)
may be on the wire with the old body: its status is left to the send's result, its
stored body is redacted at once, and the records say what happened — ``sent`` (and
redacted) when the server took it, and, when it comes back for another attempt,
rendered again without the patient, or cancelled.
"""

from __future__ import annotations

import random

import pytest
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from comms_tasks.appliers import APPLIERS
from comms_tasks.db import transaction
from comms_tasks.emails import delivery, rechecks, send_results
from comms_tasks.emails.tasks import send_email
from comms_tasks.inbound.inbox import handle
from comms_tasks.mail.message import OutgoingMessage
from comms_tasks.mail.sender import sender_from_settings
from comms_tasks.models import Email, EmailStatus, EmailTemplate, Therapist
from comms_tasks.models.base import utcnow
from comms_tasks.projections.upstream import erase_patient
from comms_tasks.settings import get_settings
from comms_tasks.task_names import QUEUE_EMAIL
from tests import factories as f
from tests.privacy.test_retention import MARKER, PATIENT, load, queued_email
from tests.smtp import SmtpSink

ERASED = 100
OTHER = 300


def erase(patient_id: int = ERASED) -> None:
    outcome = handle(PATIENT, f.patient_erased(patient_id, occurred_at=f.at(60)), APPLIERS[PATIENT])
    assert outcome.result == "applied", outcome


def claim() -> list[OutgoingMessage]:
    """What a worker does first: claim the due emails and build their messages (committed)."""
    with transaction() as session:
        return delivery.prepare_batch(session, utcnow(), 100, get_settings())


def send_and_record(messages: list[OutgoingMessage]) -> list[send_results.Recorded]:
    """What the worker does next, with the messages it built before the erasure."""
    results = [(result, utcnow()) for result in sender_from_settings(get_settings()).send(messages)]
    with transaction() as session:
        return send_results.record_results(session, results, random.Random(1))


def text_of(sink: SmtpSink, index: int = -1) -> str:
    body = sink.accepted[index].get_body(("plain",))
    assert body is not None
    return str(body.get_content())


def test_erasure_cancels_a_queued_confirmation_of_the_patient(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    asking = queued_email(1, [ERASED])
    with transaction() as session:
        asked = session.get(Email, asking)
        assert asked is not None
        [request_id] = [batch.placement_request_id for batch in asked.batches]
    message = {
        "command_id": str(f.uuid.uuid4()),
        "therapist_id": 1,
        "template": "confirmation",
        "placement_request_ids": [request_id],
        # Not threaded: the asking email is still queued, and a thread needs one sent.
        "reply_to_email_id": None,
    }
    assert handle(QUEUE_EMAIL, message, APPLIERS[QUEUE_EMAIL]).result == "applied"
    with Session(committed_db) as session:
        confirmation = session.scalars(
            select(Email.id).where(Email.template == EmailTemplate.CONFIRMATION)
        ).one()

    erase()

    cancelled = load(committed_db, confirmation)
    assert cancelled.status is EmailStatus.CANCELLED
    assert cancelled.error_message == "cancelled: its only patient was erased"
    assert MARKER not in cancelled.body_text + cancelled.body_html
    assert send_email() == {}
    assert smtp.accepted == []


@pytest.mark.parametrize("patients", [[ERASED], [ERASED, OTHER]], ids=["alone", "with_another"])
def test_an_email_on_the_wire_at_erasure_is_recorded_sent_and_redacted(
    committed_db: Engine, smtp: SmtpSink, patients: list[int]
) -> None:
    email_id = queued_email(2, patients)
    messages = claim()
    assert [message.email_id for message in messages] == [email_id]

    erase()
    during = load(committed_db, email_id)
    assert during.status is EmailStatus.SENDING
    assert during.body_text == rechecks.REDACTED_TEXT
    assert during.body_redacted_at is not None

    assert send_and_record(messages) == [send_results.Recorded(email_id, EmailStatus.SENT)]
    # What is true: the worker's message, built before the erasure, went out.
    assert f"{MARKER}-{ERASED}" in text_of(smtp)
    sent = load(committed_db, email_id)
    assert sent.status is EmailStatus.SENT
    assert sent.sent_at is not None
    assert sent.body_text == rechecks.REDACTED_TEXT and MARKER not in sent.body_html
    assert sent.body_redacted_at is not None
    # It did ask about the erased patient's request.
    assert all(batch.included for batch in sent.batches)
    assert send_email() == {}


def test_an_email_on_the_wire_at_erasure_that_comes_back_goes_out_without_the_patient(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    email_id = queued_email(3, [ERASED, OTHER])
    messages = claim()
    erase()
    smtp.script("451 4.3.0 Try again later")
    assert send_and_record(messages) == [send_results.Recorded(email_id, EmailStatus.QUEUED)]
    waiting = load(committed_db, email_id)
    assert waiting.retry_count == 1
    assert waiting.body_text == rechecks.REDACTED_TEXT

    assert send_email(email_id) == {"sent": 1}
    [message] = smtp.accepted
    assert f"{MARKER}-{OTHER}" in text_of(smtp)
    assert f"{MARKER}-{ERASED}" not in text_of(smtp)
    assert rechecks.REDACTED_TEXT not in text_of(smtp)
    assert str(message["Subject"]) == "Anfrage für einen Therapieplatz"
    sent = load(committed_db, email_id)
    assert sent.status is EmailStatus.SENT
    assert sent.body_redacted_at is None
    assert f"{MARKER}-{ERASED}" not in sent.body_text
    erased_request = ERASED * 10 + 3
    assert {b.placement_request_id: b.included for b in sent.batches} == {
        erased_request: False,
        OTHER * 10 + 3: True,
    }


def test_an_email_on_the_wire_at_erasure_of_its_only_patient_is_cancelled_if_it_comes_back(
    committed_db: Engine, smtp: SmtpSink
) -> None:
    email_id = queued_email(4, [ERASED])
    messages = claim()
    erase()
    smtp.script("451 4.3.0 Try again later")
    assert send_and_record(messages) == [send_results.Recorded(email_id, EmailStatus.QUEUED)]
    assert send_email(email_id) == {"cancelled": 1}
    cancelled = load(committed_db, email_id)
    assert cancelled.status is EmailStatus.CANCELLED
    assert cancelled.error_message == "cancelled: its only patient was erased"
    assert cancelled.body_text == rechecks.REDACTED_TEXT
    assert smtp.accepted == []


@pytest.mark.parametrize("patients", [[ERASED], [ERASED, OTHER]], ids=["alone", "with_another"])
def test_an_email_queued_with_a_summary_read_before_the_erasure_never_shows_it(
    committed_db: Engine, smtp: SmtpSink, patients: list[int]
) -> None:
    # A batch that read the summary before the erasure committed, and queued after it
    # looked for emails: only the read model knows.
    email_id = queued_email(5, patients)
    with transaction() as session:
        erase_patient(session, ERASED, f.at(60))

    sent = send_email()
    email = load(committed_db, email_id)
    assert all(f"{MARKER}-{ERASED}" not in m.as_string() for m in smtp.accepted)
    if patients == [ERASED]:
        assert sent == {"cancelled": 1}
        assert email.status is EmailStatus.CANCELLED
        assert email.error_message == "cancelled: its only patient was erased"
        assert email.body_text == rechecks.REDACTED_TEXT and email.body_redacted_at is not None
    else:
        assert sent == {"sent": 1}
        assert f"{MARKER}-{OTHER}" in text_of(smtp)
        assert MARKER + f"-{ERASED}" not in email.body_text + email.body_html


def test_erasure_cancels_an_unsent_email_it_cannot_render_again(committed_db: Engine) -> None:
    email_id = queued_email(6, [ERASED, OTHER])
    with Session(committed_db) as session, session.begin():
        session.execute(delete(Therapist).where(Therapist.id == 6))
    erase()
    email = load(committed_db, email_id)
    assert email.status is EmailStatus.CANCELLED
    assert email.error_message == "cancelled: the therapist is not known"
    assert email.body_text == rechecks.REDACTED_TEXT
