"""Read-only views for operators: what ``comms status`` and ``comms run`` show."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from comms_tasks.events.outbox import pending_count
from comms_tasks.local_time import local_iso
from comms_tasks.models import (
    DeadLetter,
    DeadLetterStatus,
    Email,
    EmailStatus,
    Patient,
    PhoneCall,
    PhoneCallStatus,
    PlacementRequest,
    PlacementRequestStatus,
    Therapist,
    TherapistStatus,
)
from comms_tasks.models.base import utcnow


def _counts(session: Session, column: Any, values: list[Any], *where: Any) -> dict[str, int]:
    rows = session.execute(select(column, func.count()).where(*where).group_by(column)).all()
    found = {str(getattr(value, "value", value)): count for value, count in rows}
    return {str(value.value): found.get(str(value.value), 0) for value in values}


def status_snapshot(session: Session, now: dt.datetime | None = None) -> dict[str, Any]:
    """Counts per status and the backlogs, as one JSON-ready mapping with a stable shape."""
    now = now or utcnow()
    from comms_tasks.worker.task_runs import last_runs

    oldest_queued = session.scalar(
        select(func.min(Email.queued_at)).where(Email.status == EmailStatus.QUEUED)
    )
    return {
        "therapists": _counts(
            session, Therapist.status, list(TherapistStatus), Therapist.deleted_at.is_(None)
        ),
        "placement_requests": _counts(
            session, PlacementRequest.status, list(PlacementRequestStatus)
        ),
        "emails": _counts(session, Email.status, list(EmailStatus)),
        "phone_calls": _counts(session, PhoneCall.status, list(PhoneCallStatus)),
        "oldest_queued_email_age_seconds": (
            None if oldest_queued is None else int((now - oldest_queued).total_seconds())
        ),
        "retries_due": session.scalar(
            select(func.count())
            .select_from(Email)
            .where(Email.status == EmailStatus.QUEUED)
            .where(Email.retry_count > 0)
            .where(Email.next_attempt_at <= now)
        )
        or 0,
        "retries_waiting": session.scalar(
            select(func.count())
            .select_from(Email)
            .where(Email.status == EmailStatus.QUEUED)
            .where(Email.retry_count > 0)
            .where(Email.next_attempt_at > now)
        )
        or 0,
        "outbox_pending": pending_count(session),
        "dead_letters_pending": session.scalar(
            select(func.count())
            .select_from(DeadLetter)
            .where(DeadLetter.status == DeadLetterStatus.PENDING)
        )
        or 0,
        "mailbox": mailbox_backlog(session),
        "last_runs": last_runs(session),
    }


def mailbox_backlog(session: Session) -> dict[str, Any]:
    """What waits for an operator in the mailbox, and when it was last read."""
    from comms_tasks.local_time import local_iso
    from comms_tasks.models import InboundMail, InboundMailState, MailboxPoll

    waiting = session.scalar(
        select(func.count())
        .select_from(InboundMail)
        .where(InboundMail.state == InboundMailState.UNMATCHED)
    )
    to_review = session.scalar(
        select(func.count())
        .select_from(InboundMail)
        .where(InboundMail.state == InboundMailState.MATCHED)
        .where(InboundMail.to_review.is_(True))
    )
    last = session.scalars(select(MailboxPoll).order_by(MailboxPoll.polled_at.desc())).first()
    return {
        "unmatched": waiting or 0,
        "to_review": to_review or 0,
        "last_poll_at": local_iso(last.polled_at) if last else None,
        "last_poll_error": last.error if last else None,
    }


# The parts of a status snapshot that change only when the service did something: not
# ages, due times or the last runs of scheduled tasks, which move on by themselves.
_COUNTED_GROUPS = ("therapists", "placement_requests", "emails", "phone_calls")
_COUNTED_TOTALS = ("retries_waiting", "dead_letters_pending")


def activity_counts(snapshot: dict[str, Any]) -> dict[str, int]:
    """The snapshot's counts that mark work done, by label ("emails sent": 3, ...)."""
    counts = {
        f"{group.replace('_', ' ')} {state}": count
        for group in _COUNTED_GROUPS
        for state, count in snapshot[group].items()
    }
    counts.update({name.replace("_", " "): int(snapshot[name]) for name in _COUNTED_TOTALS})
    return counts


def describe_changes(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """One line per count that changed ("emails sent: 3 → 4"): counts only, no data."""
    return [
        f"{label}: {before.get(label, 0)} → {count}"
        for label, count in after.items()
        if before.get(label, 0) != count
    ]


def call_sheet(session: Session, day: dt.date) -> list[dict[str, Any]]:
    """The calls of one local day, in order, with what the operator needs to discuss."""
    calls = session.scalars(
        select(PhoneCall).where(PhoneCall.scheduled_date == day).order_by(PhoneCall.scheduled_at)
    ).all()
    therapist_ids = {call.therapist_id for call in calls}
    therapists = {
        t.id: t for t in session.scalars(select(Therapist).where(Therapist.id.in_(therapist_ids)))
    }
    request_ids = {batch.placement_request_id for call in calls for batch in call.batches}
    rows = session.execute(
        select(PlacementRequest, Patient)
        .outerjoin(Patient, Patient.id == PlacementRequest.patient_id)
        .where(PlacementRequest.id.in_(request_ids))
    ).all()
    requests = {request.id: (request, patient) for request, patient in rows}
    sheet = []
    for call in calls:
        therapist = therapists.get(call.therapist_id)
        patients = []
        for batch in call.batches:
            request, patient = requests.get(batch.placement_request_id, (None, None))
            patients.append(
                {
                    "placement_request_id": batch.placement_request_id,
                    "request_status": request.status.value if request else None,
                    "discussed": batch.discussed,
                    "outcome": batch.outcome.value if batch.outcome else None,
                    "registered_on": patient.registered_on.isoformat()
                    if patient and patient.registered_on
                    else None,
                    "diagnosis": patient.diagnosis if patient else None,
                    "gender": patient.gender if patient else None,
                    "time_availability": patient.time_availability if patient else None,
                    "open_to_group_therapy": patient.open_to_group_therapy if patient else None,
                }
            )
        sheet.append(
            {
                "call_id": call.id,
                "time": call.scheduled_time.strftime("%H:%M"),
                "scheduled_at": local_iso(call.scheduled_at),
                "duration_minutes": call.duration_minutes,
                "status": call.status.value,
                "attempt": call.attempt,
                "email_id": call.email_id,
                "therapist_id": call.therapist_id,
                "therapist": therapist.display_name if therapist else None,
                "phone": therapist.phone if therapist else None,
                "patients": patients,
            }
        )
    return sheet
