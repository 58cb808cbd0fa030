"""Mail from the mailbox is health data: redacted by erasure and retention.

A reply quotes our email (the patients' summaries) and often adds details of its own.
Its bytes, its extracted text and its subject go; the row stays, with its kind, its
match and its bounce status, so that what it changed can still be explained.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ColumnElement, func, or_, select, text
from sqlalchemy.orm import Session

from comms_tasks.models import Email, EmailBatch, InboundMail, InboundMailState, PlacementRequest

# PostgreSQL advisory lock between recording mail and erasing a patient. A poll holds it
# exclusively for each transaction that writes messages (a group of them, or one); an
# erasure takes it shared before it locks anything. So an erasure waits for a group under
# way and then sees (and redacts) every row the group wrote — an unmatched reply takes no
# row lock the erasure could wait on — and the two never hold emails in opposite orders
# (a group locks them in message order, an erasure in id order). Erasures share it, so
# they do not wait for each other. SQLite has one writer at a time anyway.
MAIL_WRITES_LOCK_KEY = 7_310_642_206


def lock_for_recording(session: Session) -> None:
    """Hold the mail-writes lock until this transaction ends (a poll's group, or one)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MAIL_WRITES_LOCK_KEY})


def wait_for_recording(session: Session) -> None:
    """Wait for mail being recorded, and keep new groups out until this transaction ends."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": MAIL_WRITES_LOCK_KEY}
        )


def redact_mail(mail: InboundMail, now: dt.datetime) -> None:
    mail.raw = None
    mail.reply_text = None
    mail.subject = None
    mail.redacted_at = now


def erase_patient_from_mail(session: Session, patient_id: int, now: dt.datetime) -> int:
    """Redact every message that may quote an email about the patient.

    Those matched to such an email, and every message that matched no email and came
    after the first of them was sent: an unmatched reply (from a private address, in a
    new thread) cannot say which email it quotes, so erasure takes it too, on the side
    of privacy. Its kind, sender and time stay for operators.
    """
    asked_about = (
        select(EmailBatch.email_id)
        .join(PlacementRequest, PlacementRequest.id == EmailBatch.placement_request_id)
        .where(PlacementRequest.patient_id == patient_id)
    )
    first_sent = session.scalar(select(func.min(Email.sent_at)).where(Email.id.in_(asked_about)))
    may_quote: ColumnElement[bool] = InboundMail.email_id.in_(asked_about)
    if first_sent is not None:
        unmatched = InboundMail.state != InboundMailState.MATCHED
        may_quote = or_(may_quote, unmatched & (InboundMail.fetched_at >= first_sent))
    mails = session.scalars(
        select(InboundMail)
        .where(may_quote)
        .where(InboundMail.redacted_at.is_(None))
        .order_by(InboundMail.id)
        .with_for_update()
    ).all()
    for mail in mails:
        redact_mail(mail, now)
    return len(mails)


def redact_mail_of_emails(session: Session, email_ids: list[int], now: dt.datetime) -> int:
    """Redact the messages matched to emails whose bodies retention just redacted.

    Bounces and automatic answers move no clock of their email, yet a bounce returns the
    whole email: its copy goes with the email, not days after it.
    """
    if not email_ids:
        return 0
    mails = session.scalars(
        select(InboundMail)
        .where(InboundMail.email_id.in_(email_ids))
        .where(InboundMail.redacted_at.is_(None))
        .order_by(InboundMail.id)
        .with_for_update()
    ).all()
    for mail in mails:
        redact_mail(mail, now)
    return len(mails)


def purge_expired_mail(session: Session, now: dt.datetime, retention_days: int, limit: int) -> int:
    """Redact up to ``limit`` messages read longer ago than the retention period."""
    cutoff = now - dt.timedelta(days=retention_days)
    mails = session.scalars(
        select(InboundMail)
        .where(InboundMail.redacted_at.is_(None))
        .where(InboundMail.fetched_at < cutoff)
        .order_by(InboundMail.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for mail in mails:
        redact_mail(mail, now)
    return len(mails)
