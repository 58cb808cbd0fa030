"""An email rendered while ``patient.erased`` commits never keeps the erased summary.

Two real PostgreSQL connections in two threads (:func:`interleave`): the first
transaction stops before its commit, the second runs until it commits or waits for a
lock the first holds, then both go on. Every way an email is rendered into the queue
(the weekly batch, a confirmation, a reminder: all through ``emails.queue_emails``)
races with an erasure of one of its patients, in both orders. Whatever the order, no
stored body holds the erased patient's summary once both have committed: either the
erasure sees the new email (and drops the patient from it), or the email is rendered
from the erased read model.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.db import transaction
from comms_tasks.emails import answers, composing, weekly
from comms_tasks.models import Email, EmailStatus, EmailTemplate, Therapist
from comms_tasks.privacy import retention
from comms_tasks.projections import upstream
from comms_tasks.settings import get_settings
from tests import factories as f
from tests.privacy.test_retention import MARKER, MATCHING, THERAPIST, apply
from tests.reliability.test_concurrent_answer import interleave

ERASED = 100
OTHER = 300
# queued_email's numbering: request = patient * 10 + therapist.
ERASED_REQUEST = ERASED * 10 + 1
OTHER_REQUEST = OTHER * 10 + 1


def requests_of(*patients: int) -> None:
    apply(THERAPIST, f.therapist_upserted(1))
    for patient_id in patients:
        apply(
            MATCHING,
            f.request_created(
                patient_id * 10 + 1,
                patient_id=patient_id,
                therapist_id=1,
                diagnosis=f"{MARKER}-{patient_id}",
                current_complaints=f"{MARKER}-{patient_id}",
            ),
        )


def erase(session: Session) -> None:
    """What ``patient.erased`` applies (read_models.apply_patient_event)."""
    now = dt.datetime.now(dt.UTC)
    upstream.erase_patient(session, ERASED, now)
    retention.erase_patient_from_emails(session, ERASED, now, get_settings())


def batch(session: Session) -> None:
    weekly.batch_chunk(session, [1], dt.datetime.now(dt.UTC), get_settings())


def confirmation(session: Session) -> None:
    therapist = session.get_one(Therapist, 1)
    answers.queue_confirmation(
        session, therapist, ERASED_REQUEST, dt.datetime.now(dt.UTC), get_settings()
    )


def reminder_of(original_id: int) -> Callable[[Session], None]:
    def work(session: Session) -> None:
        original = session.get_one(Email, original_id)
        draft = composing.Draft(
            session.get_one(Therapist, 1),
            EmailTemplate.FOLLOW_UP,
            [ERASED_REQUEST, OTHER_REQUEST],
            f"reminder:{original_id}",
            in_reply_to=original,
        )
        composing.queue_emails(
            session, [draft], settings=get_settings(), now=dt.datetime.now(dt.UTC)
        )

    return work


def sent_original() -> int:
    """A sent asking email about both patients (a reminder follows it up)."""
    with transaction() as session:
        [email_id] = weekly.batch_chunk(
            session, [1], dt.datetime.now(dt.UTC), get_settings()
        ).email_ids
        email = session.get_one(Email, email_id)
        email.status = EmailStatus.SENT
        email.sent_at = dt.datetime.now(dt.UTC)
    return email_id


def bodies_showing_the_erased(engine: Engine) -> list[tuple[int, str]]:
    with Session(engine) as session:
        return [
            (email.id, email.status.value)
            for email in session.scalars(select(Email).order_by(Email.id))
            if f"{MARKER}-{ERASED}" in email.body_text + email.body_html + email.subject
        ]


def asked_about_the_erased(engine: Engine) -> list[int]:
    with Session(engine) as session:
        return [
            email.id
            for email in session.scalars(select(Email).order_by(Email.id))
            if email.status in (EmailStatus.QUEUED, EmailStatus.DRAFT)
            and email.template is not EmailTemplate.CONFIRMATION
            and any(b.included and b.placement_request_id == ERASED_REQUEST for b in email.batches)
        ]


ORDERS = pytest.mark.parametrize(
    "rendering_first", [True, False], ids=["rendering-then-erasure", "erasure-then-rendering"]
)


def race(engine: Engine, render: Callable[[Session], object], rendering_first: bool) -> None:
    if rendering_first:
        interleave(engine, render, None, erase)
    else:
        interleave(engine, erase, None, render)


@ORDERS
def test_the_batch_and_an_erasure_leave_no_body_with_the_erased_summary(
    committed_db: Engine, rendering_first: bool
) -> None:
    requests_of(ERASED, OTHER)
    race(committed_db, batch, rendering_first)
    assert bodies_showing_the_erased(committed_db) == []
    assert asked_about_the_erased(committed_db) == []
    with Session(committed_db) as session:
        [email] = session.scalars(select(Email)).all()
        assert f"{MARKER}-{OTHER}" in email.body_text
        assert email.status is EmailStatus.QUEUED


@ORDERS
def test_a_confirmation_and_an_erasure_leave_no_body_with_the_erased_summary(
    committed_db: Engine, rendering_first: bool
) -> None:
    requests_of(ERASED)
    race(committed_db, confirmation, rendering_first)
    assert bodies_showing_the_erased(committed_db) == []


@ORDERS
def test_a_reminder_and_an_erasure_leave_no_body_with_the_erased_summary(
    committed_db: Engine, rendering_first: bool
) -> None:
    requests_of(ERASED, OTHER)
    original = sent_original()
    race(committed_db, reminder_of(original), rendering_first)
    # A reminder rendered after the erasure names the erased request with an empty entry
    # until its claim drops it (test_erasure_sending); the summary is never in it.
    assert bodies_showing_the_erased(committed_db) == []
