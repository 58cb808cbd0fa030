"""Mail from the mailbox is health data (SPEC §10): redacted by erasure and retention.

A reply quotes our email (the patients' summaries) and often adds details of its own.
Its bytes, its extracted text and its subject go; the row stays, with its kind, its
match and its bounce status, so that what it changed can still be explained.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from comms_tasks.models import EmailBatch, InboundMail, PlacementRequest


def redact_mail(mail: InboundMail, now: dt.datetime) -> None:
    mail.raw = None
    mail.reply_text = None
    mail.subject = None
    mail.redacted_at = now


def erase_patient_from_mail(session: Session, patient_id: int, now: dt.datetime) -> int:
    """Redact every message matched to an email that asked about the patient."""
    asked_about = (
        select(EmailBatch.email_id)
        .join(PlacementRequest, PlacementRequest.id == EmailBatch.placement_request_id)
        .where(PlacementRequest.patient_id == patient_id)
    )
    mails = session.scalars(
        select(InboundMail)
        .where(InboundMail.email_id.in_(asked_about))
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
