"""Health data does not stay longer than it must.

- ``patient.erased``: the patient's summary leaves the read model, and every stored email
  body that showed it is redacted; an unsent email drops the patient, or is cancelled.
- Retention: email bodies are redacted once the email has been quiet for
  ``COMMS_RETENTION_DAYS``; so are the dead letters' messages
  (``comms_tasks.inbound.dead_letters``),
  the calls' free text (by the call's last activity and time) and the requests' status
  reasons (by the request's last event).
- Free text about a patient (answers and their notes per request, call notes and
  outcomes, status reasons) goes with the erasure too, and is not stored when it arrives
  later.

The email rows stay (status, dates, ids, the requests they asked about), marked with
``body_redacted_at``. Both operations are idempotent.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, event, inspect, select, update
from sqlalchemy.orm import Session, selectinload

from comms_tasks.db import transaction
from comms_tasks.emails import rechecks
from comms_tasks.inbound.dead_letters import DEAD_LETTERS_PER_CHUNK, purge_expired_dead_letters
from comms_tasks.mail.file_sender import outbox_email_ids, remove_outbox_copy
from comms_tasks.mailbox.redaction import purge_expired_mail, redact_mail_of_emails
from comms_tasks.models import (
    Email,
    EmailBatch,
    EmailStatus,
    Patient,
    PhoneCall,
    PhoneCallBatch,
    PlacementRequest,
)
from comms_tasks.settings import Settings, get_settings

UNSENT = (EmailStatus.DRAFT, EmailStatus.QUEUED, EmailStatus.SENDING)
# Unsent and not claimed by a worker: what is stored is what will be sent.
WAITING = (EmailStatus.DRAFT, EmailStatus.QUEUED)
# Emails per transaction: short locks, and progress survives an interruption.
EMAILS_PER_CHUNK = 1000
CALLS_PER_CHUNK = 1000
REQUESTS_PER_CHUNK = 1000
MAIL_PER_CHUNK = 1000


def erase_patient_from_emails(
    session: Session, patient_id: int, now: dt.datetime, settings: Settings
) -> int:
    """Redact or rewrite every email that asked about the patient; returns how many.

    - Waiting to be sent (``draft``, ``queued``), whatever its template: the patient's
      requests are dropped and it is rendered again for the others, or cancelled (and
      redacted) when no one is left.
    - Claimed by a worker (``sending``): the message, built before the erasure, may be
      on the wire, and only the send's result tells. Its status and requests stay for
      the recorder; its stored body is redacted now. Sent, it is a sent email redacted
      like any other; back in the queue, its next claim drops the erased patient
      (:func:`comms_tasks.sending.requests_to_keep`) and renders it again, or cancels it.
    - Sent, failed or cancelled: the body is redacted.
    """
    asked_about = (
        select(EmailBatch.email_id)
        .join(PlacementRequest, PlacementRequest.id == EmailBatch.placement_request_id)
        .where(PlacementRequest.patient_id == patient_id)
    )
    emails = session.scalars(
        select(Email)
        .where(Email.id.in_(asked_about))
        .where(Email.body_redacted_at.is_(None))
        .order_by(Email.id)
        .with_for_update()
    ).all()
    request_ids = set(
        session.scalars(
            select(PlacementRequest.id).where(PlacementRequest.patient_id == patient_id)
        )
    )
    # The notes about the patient's requests, wherever they are (an email redacted
    # before, an unsent one answered); a bulk statement, so no clock moves.
    if request_ids:
        session.execute(
            update(EmailBatch)
            .where(EmailBatch.placement_request_id.in_(request_ids))
            .where(EmailBatch.response_notes.is_not(None))
            .values(response_notes=None)
            .execution_options(synchronize_session="fetch")
        )
    if not emails:
        return 0
    changed = 0
    for email in emails:
        if email.status in WAITING:
            for batch in email.batches:
                if batch.placement_request_id in request_ids:
                    batch.included = False
            # Rendered again from the read model, which no longer holds the summary; a
            # cancelled one keeps no body that showed the patient.
            if not rechecks.rerender_or_cancel(session, email, settings, rechecks.PATIENT_ERASED):
                rechecks.redact(email, now)
        else:
            rechecks.redact(email, now)
        if email.body_redacted_at is not None:
            remove_outbox_copy(settings.outbox_folder, email.id, email.message_id)
        changed += 1
    return changed


def purge_expired(session: Session, now: dt.datetime, retention_days: int, limit: int) -> int:
    """Redact up to ``limit`` bodies of emails quiet for longer than the retention period."""
    cutoff = now - dt.timedelta(days=retention_days)
    emails = session.scalars(
        select(Email)
        .where(Email.body_redacted_at.is_(None))
        .where(Email.status.not_in(UNSENT))
        .where(Email.last_activity_at < cutoff)
        .order_by(Email.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .options(selectinload(Email.batches))
    ).all()
    for email in emails:
        rechecks.redact(email, now)
    redact_mail_of_emails(session, [email.id for email in emails], now)
    return len(emails)


def purge_all_expired(
    now: dt.datetime, retention_days: int, on_chunk: Callable[[int], object] | None = None
) -> dict[str, int]:
    """Redact every expired email body, dead letter, call text and status reason, a chunk
    per transaction; ``on_chunk`` hears each count. Returns how many of each."""
    return {
        "redacted": _in_chunks(purge_expired, now, retention_days, EMAILS_PER_CHUNK, on_chunk),
        "dead_letters_redacted": purge_all_expired_dead_letters(now, retention_days, on_chunk),
        "calls_redacted": _in_chunks(
            purge_expired_calls, now, retention_days, CALLS_PER_CHUNK, on_chunk
        ),
        "status_reasons_redacted": _in_chunks(
            purge_expired_status_reasons, now, retention_days, REQUESTS_PER_CHUNK, on_chunk
        ),
        "mail_redacted": _in_chunks(
            purge_expired_mail, now, retention_days, MAIL_PER_CHUNK, on_chunk
        ),
        "outbox_files_removed": remove_outbox_copies(get_settings().outbox_folder),
    }


def remove_outbox_copies(folder: Path) -> int:
    """Delete the file backend's ``.eml`` copies of every redacted email; returns how many.

    Erasure deletes the copies it knows of at once; this also finds one written after
    it (a send that was on the wire), or before this rule existed, and those of emails
    redacted by retention.
    """
    email_ids = sorted(outbox_email_ids(folder))
    removed = 0
    for start in range(0, len(email_ids), EMAILS_PER_CHUNK):
        with transaction() as session:
            redacted = session.execute(
                select(Email.id, Email.message_id)
                .where(Email.id.in_(email_ids[start : start + EMAILS_PER_CHUNK]))
                .where(Email.body_redacted_at.is_not(None))
            ).all()
        removed += sum(remove_outbox_copy(folder, row.id, row.message_id) for row in redacted)
    return removed


def purge_all_expired_dead_letters(
    now: dt.datetime, retention_days: int, on_chunk: Callable[[int], object] | None = None
) -> int:
    """Redact the health data of every dead letter past the retention period, in chunks."""
    return _in_chunks(
        purge_expired_dead_letters, now, retention_days, DEAD_LETTERS_PER_CHUNK, on_chunk
    )


def _in_chunks(
    purge: Callable[[Session, dt.datetime, int, int], int],
    now: dt.datetime,
    retention_days: int,
    limit: int,
    on_chunk: Callable[[int], object] | None,
) -> int:
    total = 0
    while True:
        with transaction() as session:
            count = purge(session, now, retention_days, limit)
        total += count
        if on_chunk is not None:
            on_chunk(count)
        if count < limit:
            return total


# --- calls and the requests' status reasons ---------------------------------------------


def redact_call(call: PhoneCall, now: dt.datetime) -> None:
    """The call's free text goes: notes, outcome and the notes per request.

    What the code wrote itself (``follow_up_notes``: "manual follow-up: …") stays; it
    names no patient. An outcome recorded later keeps no text
    (:func:`comms_tasks.calls.record_call_outcome` looks at ``text_redacted_at``).
    """
    call.notes = None
    call.outcome = None
    for batch in call.batches:
        batch.follow_up_notes = None
    call.text_redacted_at = now


def erase_patient_from_calls(session: Session, patient_id: int, now: dt.datetime) -> int:
    """Redact the text of every call about the patient's requests, whatever its status,
    and the requests' status reasons; returns how many calls (idempotent).

    A call is redacted as a whole, like an email body: its notes may speak of any of its
    requests. A scheduled call stays scheduled for its other requests.
    Runs after the emails: requests are written before calls (the lock order).
    """
    request_ids = select(PlacementRequest.id).where(PlacementRequest.patient_id == patient_id)
    session.execute(
        update(PlacementRequest)
        .where(PlacementRequest.patient_id == patient_id)
        .where(PlacementRequest.status_reason.is_not(None))
        .values(status_reason=None)
        .execution_options(synchronize_session="fetch")
    )
    calls = session.scalars(
        select(PhoneCall)
        .where(
            PhoneCall.id.in_(
                select(PhoneCallBatch.phone_call_id).where(
                    PhoneCallBatch.placement_request_id.in_(request_ids)
                )
            )
        )
        .where(PhoneCall.text_redacted_at.is_(None))
        .order_by(PhoneCall.id)
        .with_for_update()
        .options(selectinload(PhoneCall.batches))
    ).all()
    for call in calls:
        redact_call(call, now)
    return len(calls)


def purge_expired_calls(session: Session, now: dt.datetime, retention_days: int, limit: int) -> int:
    """Redact up to ``limit`` calls whose last activity and time are past the period.

    A call still scheduled is taken too once its time is that long past: nobody will
    make it any more.
    """
    cutoff = now - dt.timedelta(days=retention_days)
    calls = session.scalars(
        select(PhoneCall)
        .where(PhoneCall.text_redacted_at.is_(None))
        .where(PhoneCall.last_activity_at < cutoff)
        .where(PhoneCall.scheduled_at < cutoff)
        .order_by(PhoneCall.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .options(selectinload(PhoneCall.batches))
    ).all()
    for call in calls:
        redact_call(call, now)
    return len(calls)


def purge_expired_status_reasons(
    session: Session, now: dt.datetime, retention_days: int, limit: int
) -> int:
    """Remove up to ``limit`` status reasons of requests quiet for longer than the period
    (by the request's last event)."""
    cutoff = now - dt.timedelta(days=retention_days)
    ids = session.scalars(
        select(PlacementRequest.id)
        .where(PlacementRequest.status_reason.is_not(None))
        .where(PlacementRequest.last_event_at < cutoff)
        .order_by(PlacementRequest.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if ids:
        session.execute(
            update(PlacementRequest)
            .where(PlacementRequest.id.in_(ids))
            .values(status_reason=None)
            .execution_options(synchronize_session="fetch")
        )
    return len(ids)


@event.listens_for(PlacementRequest, "before_update")
def _no_status_reason_of_an_erased_patient(
    _mapper: Any, connection: Connection, request: PlacementRequest
) -> None:
    """A status change that comes after the erasure keeps no reason: erasure is final."""
    if request.status_reason is None:
        return
    if not inspect(request).attrs.status_reason.history.has_changes():
        return
    # Share-locked (PostgreSQL): an erasure under way holds the patient FOR UPDATE, so
    # this waits for it and reads its erased_at; or the erasure waits for this
    # transaction, and then clears the reason it wrote.
    query = select(Patient.erased_at).where(Patient.id == request.patient_id)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    erased_at = connection.execute(query).scalar()
    if erased_at is not None:
        request.status_reason = None
