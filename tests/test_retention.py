"""Erasure and retention: health data leaves stored emails, the rows stay."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from comms_tasks import emails
from comms_tasks.db import transaction
from comms_tasks.inbox import handle
from comms_tasks.models import Email, EmailStatus, Patient
from comms_tasks.retention import REDACTED_TEXT
from comms_tasks.settings import get_settings
from comms_tasks.tasks import APPLIERS
from comms_tasks.tasks.retention import purge_expired
from tests import factories as f

THERAPIST = "comms.handle_therapist_event"
MATCHING = "comms.handle_matching_event"
PATIENT = "comms.handle_patient_event"
MARKER = "ERASE-ME-3c1d"
T0 = dt.datetime(2026, 11, 23, 6, 30, tzinfo=dt.UTC)


def apply(task: str, message: dict[str, Any]) -> None:
    assert handle(task, message, APPLIERS[task]).result == "applied"


def queued_email(therapist_id: int, patients: list[int]) -> int:
    apply(THERAPIST, f.therapist_upserted(therapist_id))
    for patient_id in patients:
        apply(
            MATCHING,
            f.request_created(
                patient_id * 10 + therapist_id,
                patient_id=patient_id,
                therapist_id=therapist_id,
                diagnosis=f"{MARKER}-{patient_id}",
                current_complaints=f"{MARKER}-{patient_id}",
            ),
        )
    with transaction() as session:
        [email_id] = emails.batch_chunk(session, [therapist_id], T0, get_settings()).email_ids
    return email_id


def load(engine: Engine, email_id: int) -> Email:
    with Session(engine) as session:
        email = session.get(Email, email_id)
        assert email is not None
        _ = email.batches
        return email


def mark_sent(engine: Engine, email_id: int) -> None:
    with Session(engine) as session, session.begin():
        session.execute(
            update(Email).where(Email.id == email_id).values(status=EmailStatus.SENT, sent_at=T0)
        )


def test_erasure_redacts_sent_emails_and_rewrites_unsent_ones(committed_db: Engine) -> None:
    sent = queued_email(1, [100, 200])
    mark_sent(committed_db, sent)
    unsent = queued_email(2, [100, 300])
    only_patient = queued_email(3, [100])

    apply(PATIENT, f.patient_erased(100, occurred_at=f.at(60)))
    apply(PATIENT, f.patient_erased(100, occurred_at=f.at(61)))

    redacted = load(committed_db, sent)
    assert redacted.body_text == REDACTED_TEXT
    assert MARKER not in redacted.body_html
    assert redacted.body_redacted_at is not None
    assert redacted.status is EmailStatus.SENT
    assert len(redacted.batches) == 2

    rewritten = load(committed_db, unsent)
    assert f"{MARKER}-100" not in rewritten.body_text + rewritten.body_html
    assert f"{MARKER}-300" in rewritten.body_text
    assert rewritten.subject == "Anfrage für einen Therapieplatz"
    assert rewritten.status is EmailStatus.QUEUED

    cancelled = load(committed_db, only_patient)
    assert cancelled.status is EmailStatus.CANCELLED
    with Session(committed_db) as session:
        patient = session.get(Patient, 100)
        assert patient is not None and patient.diagnosis is None
        untouched = session.get(Patient, 200)
        assert untouched is not None and untouched.diagnosis == f"{MARKER}-200"


def test_bodies_quiet_longer_than_the_retention_period_are_redacted_once(
    committed_db: Engine,
) -> None:
    old = queued_email(4, [400])
    recent = queued_email(5, [500])
    waiting = queued_email(6, [600])
    for email_id in (old, recent):
        mark_sent(committed_db, email_id)
    retention = dt.timedelta(days=get_settings().retention_days)
    with Session(committed_db) as session, session.begin():
        for email_id in (old, waiting):
            session.execute(
                update(Email)
                .where(Email.id == email_id)
                .values(last_activity_at=dt.datetime.now(dt.UTC) - retention - dt.timedelta(days=1))
            )
    assert purge_expired() == {"redacted": 1}
    assert purge_expired() == {"redacted": 0}
    assert load(committed_db, old).body_text == REDACTED_TEXT
    assert MARKER in load(committed_db, recent).body_text
    # An email still to be sent keeps its body whatever its age.
    assert MARKER in load(committed_db, waiting).body_text
    with Session(committed_db) as session:
        assert session.scalar(select(Email.status).where(Email.id == old)) is EmailStatus.SENT


def test_scheduled_tasks_record_their_last_run(committed_db: Engine) -> None:
    from comms_tasks.reports import status_snapshot
    from comms_tasks.task_runs import record_run

    with transaction() as session:
        record_run(session, "comms.purge_expired", "SUCCESS")
        record_run(session, "comms.purge_expired", "FAILURE")
    with Session(committed_db) as session:
        runs = status_snapshot(session)["last_runs"]
    assert runs["comms.purge_expired"]["last_state"] == "FAILURE"
    assert runs["comms.purge_expired"]["last_finished_at"] is not None
    assert runs["comms.batch_requests"] == {"last_finished_at": None, "last_state": None}


def test_a_helper_run_is_not_counted_as_a_run_of_its_scheduled_task(committed_db: Engine) -> None:
    from comms_tasks.reports import status_snapshot
    from comms_tasks.tasks.batching import batch_requests

    def last_state() -> str | None:
        with Session(committed_db) as session:
            runs = status_snapshot(session)["last_runs"]
        return runs["comms.batch_requests"]["last_state"]

    # Run in this process through Celery's tracer, which sends task_postrun; with the
    # header of the beat entry, so that only ``helper`` makes the difference.
    from schedules import BEAT_HEADER

    beat = {BEAT_HEADER: True}
    assert batch_requests.apply(kwargs={"helper": True}, headers=beat).successful()
    assert last_state() is None
    assert batch_requests.apply(headers=beat).successful()
    assert last_state() == "SUCCESS"
