"""Finding the email a message answers: by its token, then its thread (both looked up
for a whole group of messages at once), then (unsure) its sender."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from comms_tasks.emails import composing
from comms_tasks.mailbox.match import MatchKeys
from comms_tasks.models import Email, EmailStatus, EmailTemplate, InboundMailKind, Therapist

# The kinds of message a therapist writes (bounces come from the mail system).
SENDER_KINDS = (InboundMailKind.REPLY, InboundMailKind.AUTO_REPLY)
# An email a sender-only match may find: one that asked and was sent, not yet answered.
UNANSWERED = (
    Email.template.in_((*composing.ASKING_TEMPLATES, EmailTemplate.FOLLOW_UP)),
    Email.status == EmailStatus.SENT,
    Email.response_received.is_(False),
)


@dataclasses.dataclass(frozen=True)
class Found:
    email: Email
    method: str  # token, thread, sender or operator
    review_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Candidates:
    """The ids of the emails a group's messages name, by reply token and by Message-ID."""

    by_token: dict[str, int]
    by_message_id: dict[str, int]

    def emails(self) -> set[int]:
        return {*self.by_token.values(), *self.by_message_id.values()}


def find_emails(session: Session, all_keys: Sequence[MatchKeys]) -> Candidates:
    """The emails named by the tokens and thread headers of a group's messages: two
    queries for the group, ids only (the emails are read when they are locked)."""
    tokens = sorted({token for keys in all_keys for token in keys.tokens})
    message_ids = sorted({message_id for keys in all_keys for message_id in keys.message_ids})
    by_token: dict[str, int] = {}
    by_message_id: dict[str, int] = {}
    if tokens:
        for email_id, token in session.execute(
            select(Email.id, Email.reply_token).where(Email.reply_token.in_(tokens))
        ):
            if token is not None:
                by_token[token] = email_id
    if message_ids:
        for email_id, message_id in session.execute(
            select(Email.id, Email.message_id).where(Email.message_id.in_(message_ids))
        ):
            by_message_id[message_id] = email_id
    return Candidates(by_token, by_message_id)


def sender_candidates(session: Session, senders: Sequence[str]) -> set[int]:
    """The emails a sender-only match could find for ``senders``: the unanswered sent
    emails of the therapists with those addresses, one query. Locked with the group's
    others, in id order; which one (if any) a message matches is decided at its turn.
    """
    addresses = sorted({sender.lower() for sender in senders})
    if not addresses:
        return set()
    return set(
        session.scalars(
            select(Email.id)
            .join(Therapist, Therapist.id == Email.therapist_id)
            .where(func.lower(Therapist.email).in_(addresses))
            .where(*UNANSWERED)
        )
    )


def is_named(candidates: Candidates, keys: MatchKeys) -> bool:
    """Whether a message names one of the candidates by its token or its thread."""
    return any(token in candidates.by_token for token in keys.tokens) or any(
        message_id in candidates.by_message_id for message_id in keys.message_ids
    )


def found_among(
    candidates: Candidates, emails: Mapping[int, Email], keys: MatchKeys, kind: InboundMailKind
) -> Found | None:
    """The email a message answers by its token, then by its thread, among the group's
    (``emails``: those candidates, locked)."""
    for token in keys.tokens:
        found = emails.get(candidates.by_token.get(token, 0))
        if found is not None:
            return Found(found, "token", _other_sender(found, keys, kind))
    for message_id in keys.message_ids:
        found = emails.get(candidates.by_message_id.get(message_id, 0))
        if found is not None:
            return Found(found, "thread", _other_sender(found, keys, kind))
    return None


def find_by_sender(session: Session, keys: MatchKeys, kind: InboundMailKind) -> Found | None:
    """Unsure: the one unanswered email of the one therapist with the sender's address.

    Asked at the message's turn in its group, after the messages before it were applied:
    an email one of them answered is no longer unanswered.
    """
    if kind in SENDER_KINDS and keys.sender:
        found = _only_unanswered_email_of(session, keys.sender)
        if found is not None:
            return Found(found, "sender", "matched by its sender alone")
    return None


def _other_sender(found: Email, keys: MatchKeys, kind: InboundMailKind) -> str | None:
    if kind not in SENDER_KINDS:
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
            select(Email).where(Email.therapist_id == therapists[0]).where(*UNANSWERED).limit(2)
        )
    )
    return unanswered[0] if len(unanswered) == 1 else None
