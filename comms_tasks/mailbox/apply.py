"""What a message from the mailbox changes: found its email, then recorded once.

Each message's row in ``inbound_mail`` (unique on where the mailbox keeps it and on its
bytes' hash) is written with its effects and their outbox events, in the transaction of
its group (:mod:`comms_tasks.mailbox.tasks`). A message seen again — a poll that crashed
between its commit and the move — is found by either and changes nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import re
import uuid
from collections.abc import Sequence

from pydantic import ValidationError
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from comms_tasks.contracts import Rejected, received
from comms_tasks.contracts.limits import MAX_EMAIL, MAX_TEXT
from comms_tasks.emails import answers
from comms_tasks.mailbox import bounces, email_lookup
from comms_tasks.mailbox.classify import Classified, MailKind
from comms_tasks.mailbox.match import MatchKeys
from comms_tasks.mailbox.redaction import redact_mail
from comms_tasks.mailbox.sources import Fetched
from comms_tasks.models import Email, InboundMail, InboundMailKind, InboundMailState
from comms_tasks.models.inbound_mail import (
    MAX_DIAGNOSTIC,
    MAX_MAIL_MESSAGE_ID,
    MAX_MAIL_SUBJECT,
    MAX_REASON,
)
from comms_tasks.settings import Settings

# Commands recorded for mailbox replies get ids of their own namespace: the same message
# always makes the same command id.
MAILBOX_COMMANDS = uuid.UUID("8f0e1d4c-5b6a-4e1f-9a3b-2c7d6e5f4a31")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclasses.dataclass(frozen=True)
class Applied:
    """What one message did: its row, and whether it was new (False: seen before)."""

    mail_id: int
    kind: InboundMailKind
    state: InboundMailState
    new: bool
    # A permanent bounce marked an email as waiting for its call: book it now.
    call_requested: bool = False
    # A reply queued confirmation emails (never: outcomes are not guessed) or cancelled.
    email_id: int | None = None


def one_line(value: str | None, limit: int) -> str | None:
    """A stranger's header value, storable and showable: no control characters, bounded."""
    if value is None:
        return None
    text = " ".join(_CONTROL.sub(" ", str(value)).split())
    return text[:limit] or None


def reply_content(text: str | None) -> str | None:
    """A reply's new text as a response's content: line breaks kept, nothing else hidden."""
    if not text:
        return None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    cleaned = "\n".join(_CONTROL.sub("", line.replace("\t", "    ")).rstrip() for line in lines)
    return cleaned.strip()[:MAX_TEXT] or None


def message_date(raw_date: str | None, now: dt.datetime) -> dt.datetime:
    """The message's Date header when it is a plausible past instant, else ``now``."""
    if raw_date:
        try:
            parsed = email.utils.parsedate_to_datetime(raw_date)
        except (TypeError, ValueError, IndexError, OverflowError):
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            parsed = parsed.astimezone(dt.UTC)
            if dt.datetime(2000, 1, 1, tzinfo=dt.UTC) <= parsed <= now:
                return parsed
    return now


class SeenBefore:
    """The rows of a group's messages already kept, read in one query for the group.

    A message is known by where the mailbox keeps it or by its bytes' hash; the rows the
    group adds are added here too, so that the same bytes twice in one group are applied
    once. A message recorded alone is a group of one.
    """

    def __init__(self, session: Session, source: str, group: Sequence[Fetched]) -> None:
        self.source = source
        keys = sorted({fetched.key for fetched in group})
        hashes = sorted({fetched.sha256 for fetched in group})
        rows = session.scalars(
            select(InboundMail).where(
                or_(
                    (InboundMail.source == source) & InboundMail.source_key.in_(keys),
                    InboundMail.raw_sha256.in_(hashes),
                )
            )
        ).all()
        self._by_key: dict[str, InboundMail] = {}
        self._by_hash: dict[str, InboundMail] = {}
        for row in rows:
            self.add(row)

    def add(self, mail: InboundMail) -> None:
        if mail.source == self.source:
            self._by_key.setdefault(mail.source_key, mail)
        self._by_hash.setdefault(mail.raw_sha256, mail)

    def find(self, fetched: Fetched) -> InboundMail | None:
        return self._by_key.get(fetched.key) or self._by_hash.get(fetched.sha256)


# --- finding the email -------------------------------------------------------------------


# --- recording it --------------------------------------------------------------------------


def record_mail(
    session: Session,
    source: str,
    fetched: Fetched,
    classified: Classified,
    keys: MatchKeys,
    *,
    subject: str | None,
    message_id: str | None,
    date: str | None,
    now: dt.datetime,
    settings: Settings,
    seen: SeenBefore,
) -> Applied:
    """Keep one message from the mailbox and apply what it means, once.

    ``seen``: the group's messages kept before, when the message is one of a group.
    """
    known = seen.find(fetched)
    if known is not None:
        return Applied(known.id, known.kind, known.state, new=False, email_id=known.email_id)
    kind = InboundMailKind(classified.kind.value)
    mail = InboundMail(
        source=source,
        source_key=fetched.key,
        raw_sha256=fetched.sha256,
        size=len(fetched.raw),
        fetched_at=now,
        received_at=message_date(date, now),
        kind=kind,
        state=InboundMailState.UNMATCHED,
        sender=one_line(keys.sender, MAX_EMAIL),
        subject=one_line(subject, MAX_MAIL_SUBJECT),
        message_id=one_line(message_id, MAX_MAIL_MESSAGE_ID),
        status_code=bounces._status(classified.status_code),
        diagnostic=one_line(classified.diagnostic, MAX_DIAGNOSTIC),
        auto_reason=one_line(classified.auto_submitted_reason, MAX_REASON),
        defect=one_line(classified.defect, MAX_REASON),
        reply_text=reply_content(classified.reply_text),
        raw=fetched.raw,
    )
    # Added once everything about it is known: one INSERT, no UPDATE after it.
    found = (
        None if kind is InboundMailKind.UNRELATED else email_lookup.find_email(session, keys, kind)
    )
    call_requested = False
    if found is not None:
        lock_found(session, found)
        copy_id = earlier_copy(session, mail, found.email)
        if copy_id is not None:
            keep_as_copy(mail, found, copy_id)
        else:
            call_requested = apply_to(session, mail, found, classified, now, settings)
        if found.email.body_redacted_at is not None:
            # Its email was redacted (erasure or retention): a reply quoting it is too.
            redact_mail(mail, now)
    session.add(mail)
    session.flush()
    seen.add(mail)
    return Applied(
        mail.id,
        mail.kind,
        mail.state,
        new=True,
        call_requested=call_requested,
        email_id=mail.email_id,
    )


def lock_found(session: Session, found: email_lookup.Found) -> None:
    """Lock the email found and its thread, and read them again, before applying.

    The email was found without a lock: a ``patient.erased`` (or the purge) may have
    redacted it since, and its redaction decides what of the message is kept. Locked in id
    order up the thread (:func:`~comms_tasks.emails.lock_thread`), the order erasure and
    answers lock in: an erasure under way is waited for and then seen, and one that starts
    now waits for this message's row and then redacts it.
    """
    answers.lock_thread(session, found.email.id)  # read again as it is now


def earlier_copy(session: Session, mail: InboundMail, email: Email) -> int | None:
    """The id of another copy of ``mail`` already applied to ``email``, if one is.

    One message can reach the mailbox twice with different bytes: a reply to all of our
    sender and our tagged reply address is delivered once per address, each copy with a
    Delivered-To line of its own, so neither the key nor the hash knows it. The same
    Message-ID from the same sender, of the same kind, already applied to the same email is
    that message again (the email's own messages only: a handful, read by their index and
    compared here, so that no plan can prefer an index on the kind, which holds most rows).
    """
    if mail.message_id is None or mail.sender is None:
        return None
    for copy_id, state, kind, message_id, sender in session.execute(
        select(
            InboundMail.id,
            InboundMail.state,
            InboundMail.kind,
            InboundMail.message_id,
            InboundMail.sender,
        )
        .where(InboundMail.email_id == email.id)
        .order_by(InboundMail.id)
    ):
        if (
            copy_id != mail.id
            and state is InboundMailState.MATCHED
            and kind is mail.kind
            and message_id == mail.message_id
            and sender == mail.sender
        ):
            return int(copy_id)
    return None


def keep_as_copy(mail: InboundMail, found: email_lookup.Found, copy_id: int) -> None:
    """Keep a second copy with its email, filed like the first, applying nothing again."""
    mail.email_id = found.email.id
    mail.match_method = found.method
    mail.state = InboundMailState.MATCHED
    mail.to_review = False
    mail.review_reason = one_line(f"another copy of message {copy_id}: not applied", MAX_REASON)


def apply_to(
    session: Session,
    mail: InboundMail,
    found: email_lookup.Found,
    classified: Classified,
    now: dt.datetime,
    settings: Settings,
) -> bool:
    """Apply a matched message to its email; True when a call is to be booked now.

    A reply the email cannot take (not sent, say) stays unmatched, with the reason.
    """
    mail.email_id = found.email.id
    mail.match_method = found.method
    mail.to_review = found.review_reason is not None
    mail.review_reason = found.review_reason
    mail.state = InboundMailState.MATCHED
    if mail.kind is InboundMailKind.REPLY:
        try:
            record_reply(session, mail, found.email, now, settings)
        except Rejected as exc:
            mail.state = InboundMailState.UNMATCHED
            mail.to_review = True
            mail.review_reason = one_line(exc.reason, MAX_REASON)
        return False
    if mail.kind in (InboundMailKind.BOUNCE, InboundMailKind.DELAYED):
        permanent = mail.kind is InboundMailKind.BOUNCE
        return bounces.record_bounce(
            session,
            found.email,
            permanent=permanent,
            status=mail.status_code,
            diagnostic=mail.diagnostic,
            failed_recipients=classified.failed_recipients,
            bounced_at=mail.received_at,
            now=now,
        )
    return False  # an automatic answer: kept and shown, the 7-day clock runs on


def record_reply(
    session: Session, mail: InboundMail, email: Email, now: dt.datetime, settings: Settings
) -> None:
    """A human reply, through the path of ``comms.record_email_response``; no outcomes."""
    received_at = max(mail.received_at, email.sent_at) if email.sent_at else mail.received_at
    fields = {
        "command_id": str(uuid.uuid5(MAILBOX_COMMANDS, mail.raw_sha256)),
        "email_id": email.id,
        "received_at": received_at,
        "content": mail.reply_text,
        "outcomes": [],
    }
    try:
        command = received.RecordEmailResponse.model_validate(fields)
    except ValidationError:
        # Text the contract refuses (it never should: cleaned above) is kept on the
        # message only; the response is recorded without it.
        command = received.RecordEmailResponse.model_validate({**fields, "content": None})
    # Reminders queued before now (the reply read, or assigned by an operator) were queued
    # without knowing of it, whatever its Date says.
    answers.record_response(session, command, now, settings, source="mailbox", known_at=now)


def assign(
    session: Session, mail: InboundMail, email: Email, now: dt.datetime, settings: Settings
) -> bool:
    """An operator's match: applied as if the mailbox had found it."""
    classified = Classified(
        kind=MailKind(mail.kind.value),
        status_code=mail.status_code,
        diagnostic=mail.diagnostic,
        failed_recipients=(),
        returned_message_ids=(),
        reply_text=mail.reply_text,
        auto_submitted_reason=mail.auto_reason,
        defect=mail.defect,
    )
    found = email_lookup.Found(email, "operator")
    lock_found(session, found)
    call_requested = apply_to(session, mail, found, classified, now, settings)
    if email.body_redacted_at is not None:
        redact_mail(mail, now)
    return call_requested
