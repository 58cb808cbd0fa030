"""Finding the email a message answers: by its token, then its thread, then (unsure)
its sender."""

from __future__ import annotations

import dataclasses

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from comms_tasks.emails import composing
from comms_tasks.mailbox.match import MatchKeys
from comms_tasks.models import Email, EmailStatus, EmailTemplate, InboundMailKind, Therapist


@dataclasses.dataclass(frozen=True)
class Found:
    email: Email
    method: str  # token, thread, sender or operator
    review_reason: str | None = None


def find_email(session: Session, keys: MatchKeys, kind: InboundMailKind) -> Found | None:
    """The email a message answers: its token, then the thread, then (unsure) the sender."""
    for token in keys.tokens:
        found = session.scalar(select(Email).where(Email.reply_token == token))
        if found is not None:
            return Found(found, "token", _other_sender(found, keys, kind))
    for message_id in keys.message_ids:
        found = session.scalar(select(Email).where(Email.message_id == message_id))
        if found is not None:
            return Found(found, "thread", _other_sender(found, keys, kind))
    if kind in (InboundMailKind.REPLY, InboundMailKind.AUTO_REPLY) and keys.sender:
        found = _only_unanswered_email_of(session, keys.sender)
        if found is not None:
            return Found(found, "sender", "matched by its sender alone")
    return None


def _other_sender(found: Email, keys: MatchKeys, kind: InboundMailKind) -> str | None:
    if kind not in (InboundMailKind.REPLY, InboundMailKind.AUTO_REPLY):
        return None  # bounces come from the mail system, not from the therapist
    if keys.sender and keys.sender.lower() == found.recipient_email.lower():
        return None
    return "sent from an address other than the therapist's"


def _only_unanswered_email_of(session: Session, sender: str) -> Email | None:
    therapists = list(
        session.scalars(
            select(Therapist.id).where(func.lower(Therapist.email) == sender.lower()).limit(2)
        )
    )
    if len(therapists) != 1:
        return None
    unanswered = list(
        session.scalars(
            select(Email)
            .where(Email.therapist_id == therapists[0])
            .where(Email.template.in_((*composing.ASKING_TEMPLATES, EmailTemplate.FOLLOW_UP)))
            .where(Email.status == EmailStatus.SENT)
            .where(Email.response_received.is_(False))
            .limit(2)
        )
    )
    return unanswered[0] if len(unanswered) == 1 else None
