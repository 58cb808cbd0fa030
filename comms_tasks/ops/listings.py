"""What the ``comms`` command lists and reports, as queries: dead letters, emails, mail
read from the mailbox, and what a run did. Rows only; the command shows them."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from comms_tasks.models import (
    DeadLetter,
    DeadLetterStatus,
    Email,
    EmailStatus,
    InboundMail,
    InboundMailKind,
    InboundMailState,
    PhoneCall,
    PhoneCallStatus,
)


def dead_letters(session: Session, *, include_replayed: bool, limit: int) -> Sequence[DeadLetter]:
    """The newest dead letters first; pending ones only unless ``include_replayed``."""
    query = select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)
    if not include_replayed:
        query = query.where(DeadLetter.status == DeadLetterStatus.PENDING)
    return session.scalars(query).all()


def replayable_dead_letter_ids(session: Session) -> list[int]:
    """Pending dead letters that still hold their message (a redacted one has nothing)."""
    return list(
        session.scalars(
            select(DeadLetter.id)
            .where(DeadLetter.status == DeadLetterStatus.PENDING)
            .where(DeadLetter.payload_redacted_at.is_(None))
            .order_by(DeadLetter.id)
        )
    )


def emails(
    session: Session, *, status: EmailStatus | None, therapist_id: int | None, limit: int
) -> Sequence[Email]:
    """The newest emails first, of one status and one therapist when given."""
    query = select(Email).order_by(Email.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Email.status == status)
    if therapist_id is not None:
        query = query.where(Email.therapist_id == therapist_id)
    return session.scalars(query).all()


def inbound_mail(
    session: Session,
    *,
    kind: InboundMailKind | None,
    unmatched: bool,
    to_review: bool,
    limit: int,
) -> Sequence[InboundMail]:
    """The newest messages read from the mailbox first, filtered as asked."""
    query = select(InboundMail).order_by(InboundMail.id.desc()).limit(limit)
    if kind is not None:
        query = query.where(InboundMail.kind == kind)
    if unmatched:
        query = query.where(InboundMail.state == InboundMailState.UNMATCHED)
    if to_review:
        query = query.where(InboundMail.to_review.is_(True))
    return session.scalars(query).all()


def therapists_emailed_since(session: Session, since: dt.datetime) -> list[int]:
    """The therapist of each email sent since ``since`` (one entry per email)."""
    return list(
        session.scalars(
            select(Email.therapist_id)
            .where(Email.status == EmailStatus.SENT)
            .where(Email.sent_at >= since)
        )
    )


def first_call_day(session: Session) -> dt.date | None:
    """The day of the earliest scheduled call, if one is."""
    return session.scalar(
        select(PhoneCall.scheduled_date)
        .where(PhoneCall.status == PhoneCallStatus.SCHEDULED)
        .order_by(PhoneCall.scheduled_at)
        .limit(1)
    )


@dataclasses.dataclass(frozen=True)
class MailEffect:
    """A message read from the mailbox, its email (if found) and that email's calls."""

    mail_id: int
    kind: InboundMailKind
    status_code: str | None
    email_id: int | None
    calls: tuple[tuple[int, PhoneCallStatus], ...]


def mailbox_effects(session: Session) -> list[MailEffect]:
    """Every message read from the mailbox, oldest first, with its email's calls."""
    mails = session.scalars(select(InboundMail).order_by(InboundMail.id)).all()
    email_ids = sorted({mail.email_id for mail in mails if mail.email_id is not None})
    calls: dict[int, list[tuple[int, PhoneCallStatus]]] = {}
    if email_ids:
        for call_id, email_id, status in session.execute(
            select(PhoneCall.id, PhoneCall.email_id, PhoneCall.status)
            .where(PhoneCall.email_id.in_(email_ids))
            .order_by(PhoneCall.id)
        ):
            if email_id is not None:
                calls.setdefault(email_id, []).append((call_id, status))
    known = set(session.scalars(select(Email.id).where(Email.id.in_(email_ids))))
    effects = []
    for mail in mails:
        email_id = mail.email_id if mail.email_id in known else None
        found = tuple(calls.get(email_id, ())) if email_id is not None else ()
        effects.append(MailEffect(mail.id, mail.kind, mail.status_code, email_id, found))
    return effects
