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

from pydantic import ValidationError
from sqlalchemy.orm import Session

from comms_tasks.contracts import Rejected, received
from comms_tasks.contracts.limits import MAX_EMAIL, MAX_TEXT
from comms_tasks.emails import answers
from comms_tasks.emails.threads import Threads, lock_threads
from comms_tasks.mailbox import bounces, email_lookup
from comms_tasks.mailbox.classify import Classified, MailKind
from comms_tasks.mailbox.groups import Group, Reading
from comms_tasks.mailbox.redaction import redact_mail
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


@dataclasses.dataclass(frozen=True)
class Recorded:
    """A message recorded (or found kept) in a group's transaction, its row not yet
    written: :meth:`applied` once the group's rows are flushed."""

    mail: InboundMail
    new: bool
    call_requested: bool = False

    def applied(self) -> Applied:
        mail = self.mail
        assert mail.id is not None, "the group's rows are flushed first"
        return Applied(
            mail.id,
            mail.kind,
            mail.state,
            new=self.new,
            call_requested=self.call_requested,
            email_id=mail.email_id,
        )


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


# --- recording it --------------------------------------------------------------------------


def record_mail(
    session: Session,
    source: str,
    reading: Reading,
    *,
    now: dt.datetime,
    settings: Settings,
    group: Group,
) -> Recorded:
    """Keep one message from the mailbox and apply what it means, once.

    ``group``: what the message's group read and locked for it (a message recorded alone
    is a group of one). The message's row is added, not flushed: the group writes its
    rows together (:meth:`Recorded.applied` after that).
    """
    fetched, classified, keys = reading.fetched, reading.classified, reading.keys
    assert classified is not None, "a message fetched by its header only is kept, not read"
    known = group.seen.find(fetched)
    if known is not None:
        return Recorded(known, new=False)
    kind = InboundMailKind(classified.kind.value)
    mail = InboundMail.new(
        source=source,
        source_key=fetched.key,
        raw_sha256=fetched.sha256,
        size=len(fetched.raw),
        fetched_at=now,
        received_at=message_date(reading.date, now),
        kind=kind,
        state=InboundMailState.UNMATCHED,
        sender=one_line(keys.sender, MAX_EMAIL),
        subject=one_line(reading.subject, MAX_MAIL_SUBJECT),
        message_id=one_line(reading.message_id, MAX_MAIL_MESSAGE_ID),
        status_code=bounces._status(classified.status_code),
        diagnostic=one_line(classified.diagnostic, MAX_DIAGNOSTIC),
        auto_reason=one_line(classified.auto_submitted_reason, MAX_REASON),
        defect=one_line(classified.defect, MAX_REASON),
        reply_text=reply_content(classified.reply_text),
        raw=fetched.raw,
    )
    # Added once everything about it is known: one INSERT, no UPDATE after it.
    found = None if kind is InboundMailKind.UNRELATED else group.found(session, keys, kind)
    call_requested = False
    if found is not None:
        copy_id = group.earlier_copy(session, mail, found.email)
        if copy_id is not None:
            keep_as_copy(mail, found, copy_id)
        else:
            call_requested = apply_to(
                session, mail, found, classified, now, settings, group.threads
            )
        if found.email.body_redacted_at is not None:
            # Its email was redacted (erasure or retention): a reply quoting it is too.
            redact_mail(mail, now)
    session.add(mail)
    group.add(mail)
    return Recorded(mail, new=True, call_requested=call_requested)


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
    threads: Threads,
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
            record_reply(session, mail, found.email, now, settings, threads)
        except Rejected as exc:
            mail.state = InboundMailState.UNMATCHED
            mail.to_review = True
            mail.review_reason = one_line(exc.reason, MAX_REASON)
        return False
    if mail.kind in (InboundMailKind.BOUNCE, InboundMailKind.DELAYED):
        permanent = mail.kind is InboundMailKind.BOUNCE
        return bounces.record_bounce(
            session,
            threads,
            found.email.id,
            permanent=permanent,
            status=mail.status_code,
            diagnostic=mail.diagnostic,
            failed_recipients=classified.failed_recipients,
            bounced_at=mail.received_at,
            now=now,
        )
    return False  # an automatic answer: kept and shown, the 7-day clock runs on


def record_reply(
    session: Session,
    mail: InboundMail,
    email: Email,
    now: dt.datetime,
    settings: Settings,
    threads: Threads,
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
    answers.record_response(
        session, command, now, settings, source="mailbox", known_at=now, threads=threads
    )


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
    # The email and its thread locked and read again as they are now (an erasure may
    # have redacted it since it was read).
    threads = lock_threads(session, [email.id])
    call_requested = apply_to(session, mail, found, classified, now, settings, threads)
    if email.body_redacted_at is not None:
        redact_mail(mail, now)
    return call_requested
