"""Read-only views for operators: what ``comms status`` and ``comms run`` show."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from comms_tasks.models import (
    DeadLetter,
    DeadLetterStatus,
    Email,
    EmailStatus,
    OutboxEvent,
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
        "outbox_pending": session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None))
        )
        or 0,
        "dead_letters_pending": session.scalar(
            select(func.count())
            .select_from(DeadLetter)
            .where(DeadLetter.status == DeadLetterStatus.PENDING)
        )
        or 0,
    }
