"""Commands about emails: ``comms.record_email_response`` and ``comms.queue_email``."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from comms_tasks import emails
from comms_tasks.app import app
from comms_tasks.contracts import QUEUE_EMAIL, RECORD_EMAIL_RESPONSE, inbound
from comms_tasks.inbox import handle_call
from comms_tasks.models.base import utcnow
from comms_tasks.settings import get_settings
from comms_tasks.tasks.inbound import inbound_task_options
from comms_tasks.tasks.sending import send_email_after_commit


def apply_email_response(session: Session, command: inbound.RecordEmailResponse) -> None:
    if emails.record_response(session, command, utcnow(), get_settings()):
        send_email_after_commit(session)


def apply_queue_email(session: Session, command: inbound.QueueEmail) -> None:
    emails.queue_requested_email(session, command, utcnow(), get_settings())
    send_email_after_commit(session)


@app.task(name=RECORD_EMAIL_RESPONSE, **inbound_task_options())
def record_email_response(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return handle_call(RECORD_EMAIL_RESPONSE, args, kwargs, apply_email_response).as_dict()


@app.task(name=QUEUE_EMAIL, **inbound_task_options())
def queue_email(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return handle_call(QUEUE_EMAIL, args, kwargs, apply_queue_email).as_dict()
