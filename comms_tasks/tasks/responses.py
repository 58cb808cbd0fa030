"""Commands about emails: ``comms.record_email_response`` and ``comms.queue_email``."""

from __future__ import annotations

from sqlalchemy.orm import Session

from comms_tasks.contracts import QUEUE_EMAIL, RECORD_EMAIL_RESPONSE, received
from comms_tasks.models.base import utcnow
from comms_tasks.settings import get_settings
from comms_tasks.projections.tasks import inbound_task
from comms_tasks.emails.tasks import send_email_after_commit
from comms_tasks.emails import answers


def apply_email_response(session: Session, command: received.RecordEmailResponse) -> None:
    if answers.record_response(session, command, utcnow(), get_settings()):
        send_email_after_commit(session)


def apply_queue_email(session: Session, command: received.QueueEmail) -> None:
    if answers.queue_requested_email(session, command, utcnow(), get_settings()):
        send_email_after_commit(session)


record_email_response = inbound_task(RECORD_EMAIL_RESPONSE, apply_email_response)
queue_email = inbound_task(QUEUE_EMAIL, apply_queue_email)
