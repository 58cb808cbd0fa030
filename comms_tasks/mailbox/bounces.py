"""What a bounce changes: noted on its email, a permanent one flags the address
undeliverable and asks for the follow-up call now."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from sqlalchemy.orm import Session

from comms_tasks.contracts.published import EmailBouncedPayload
from comms_tasks.emails import composing
from comms_tasks.emails.threads import Threads
from comms_tasks.events.outbox import record_event
from comms_tasks.models import Email, EmailStatus, EmailTemplate, Therapist

_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


def _status(value: str | None) -> str | None:
    return value if value and _STATUS.match(value) else None


def record_bounce(
    session: Session,
    threads: Threads,
    email_id: int,
    *,
    permanent: bool,
    status: str | None,
    diagnostic: str | None,
    failed_recipients: Sequence[str],
    bounced_at: dt.datetime,
    now: dt.datetime,
) -> bool:
    """Note a bounce on its email; a permanent one also flags the address and asks a call.

    A temporary bounce after a permanent one changes nothing; a permanent one upgrades a
    temporary one. Returns whether the email now waits for its follow-up call. ``threads``:
    the email's thread, locked (:func:`~comms_tasks.emails.threads.lock_threads`).
    """
    locked = threads.email(email_id)
    assert locked is not None, "the bounced email's thread is locked first"
    if locked.bounce_permanent and not permanent:
        return False
    if locked.bounced_at is not None and locked.bounce_permanent == permanent:
        return False  # the same news again (a second delay notice, a second bounce)
    locked.bounced_at = bounced_at
    locked.bounce_permanent = permanent
    locked.bounce_status = status
    locked.bounce_diagnostic = diagnostic
    record_event(
        session,
        EmailBouncedPayload(
            email_id=locked.id,
            therapist_id=locked.therapist_id,
            permanent=permanent,
            status=status,
            bounced_at=bounced_at,
        ),
        occurred_at=now,
    )
    if not permanent:
        return False
    recipients = {address.lower() for address in failed_recipients}
    if not recipients or locked.recipient_email.lower() in recipients:
        flag_undeliverable(session, locked, status, bounced_at)
    return request_call_now(threads, locked, now)


def flag_undeliverable(
    session: Session, email: Email, status: str | None, bounced_at: dt.datetime
) -> None:
    """The address the email bounced from, while it is the therapist's: no more email."""
    with session.no_autoflush:  # the group's rows are written together, at its end
        therapist = session.get(Therapist, email.therapist_id, with_for_update=True)
    if therapist is None or not therapist.email:
        return
    if therapist.email.lower() != email.recipient_email.lower():
        return  # the therapist service already sent another address
    therapist.undeliverable_email = therapist.email
    therapist.undeliverable_since = bounced_at
    therapist.undeliverable_status = status


def request_call_now(threads: Threads, email: Email, now: dt.datetime) -> bool:
    """The follow-up call of a bounced email, now rather than after the waiting days.

    A reminder that bounced asks for the call of the email it follows up. Nothing when
    the email was answered, already waits for a call, or has one.
    """
    asking = email
    if email.template is EmailTemplate.FOLLOW_UP and email.in_reply_to_email_id is not None:
        original = threads.email(email.in_reply_to_email_id)
        if original is None:
            return False
        asking = original
    if asking.template not in composing.ASKING_TEMPLATES or asking.status is not EmailStatus.SENT:
        return False
    if (
        asking.response_received
        or asking.call_requested_at is not None
        or asking.follow_up_settled_at is not None
    ):
        return False
    if threads.scheduled_calls(asking.id):
        return False
    asking.call_requested_at = now
    return True
