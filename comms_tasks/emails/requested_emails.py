"""Emails other services ask for (``comms.queue_email``): a reminder of an email, or
confirmations of accepted requests; and which requests are still pending."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from comms_tasks.contracts import Rejected, received
from comms_tasks.emails import composing
from comms_tasks.emails.answers import queue_confirmation
from comms_tasks.inbound import checks
from comms_tasks.models import (
    Email,
    EmailStatus,
    EmailTemplate,
    PlacementRequest,
    PlacementRequestStatus,
    Therapist,
)
from comms_tasks.models.enums import PENDING_REQUEST_STATUSES
from comms_tasks.settings import Settings


def queue_requested_email(
    session: Session, command: received.QueueEmail, now: dt.datetime, settings: Settings
) -> list[Email]:
    """``comms.queue_email``: a follow-up or confirmations for given requests.

    A ``follow_up`` is one email per command (the command id is its key). A
    ``confirmation`` is one per request, whatever command asks (``confirmation:<id>``, as
    when an answer or a call accepts it): requests already confirmed are left out, and a
    command that finds all of them confirmed queues nothing. Returns what it queued.
    """
    command_id = str(command.command_id)
    therapist = checks.known_therapist(session, command.therapist_id, command_id)
    if not therapist.email:
        raise Rejected("command.therapist_id: the therapist has no email address", command_id)
    checks.check_requests_of(session, therapist.id, command.placement_request_ids, command_id)
    original = None
    if command.reply_to_email_id is not None:
        original = session.get(Email, command.reply_to_email_id)
        if original is None or original.therapist_id != therapist.id:
            raise Rejected("command.reply_to_email_id: unknown email of this therapist", command_id)
        if original.status is not EmailStatus.SENT:
            # A reminder of (or a thread to) an email nobody received; replayable once sent.
            raise Rejected(
                f"command.reply_to_email_id: the email was not sent ({original.status.value})",
                command_id,
            )
    template = EmailTemplate(command.template)
    if template is EmailTemplate.CONFIRMATION:
        return _queue_requested_confirmations(
            session, therapist, command.placement_request_ids, command_id, now, settings, original
        )
    if original is None:
        raise Rejected(
            "command.reply_to_email_id: a follow_up needs the original email", command_id
        )
    return [
        composing.queue_email_for(
            session,
            therapist,
            template,
            list(command.placement_request_ids),
            dedup_key=f"command:{command_id}",
            settings=settings,
            now=now,
            in_reply_to=original,
        )
    ]


# A request that ended so is never confirmed: the therapist would be told of a placement
# that does not exist.
NOT_CONFIRMABLE = (PlacementRequestStatus.REJECTED, PlacementRequestStatus.CANCELLED)


def _queue_requested_confirmations(
    session: Session,
    therapist: Therapist,
    request_ids: Sequence[int],
    command_id: str,
    now: dt.datetime,
    settings: Settings,
    original: Email | None,
) -> list[Email]:
    # Lock order (patients -> requests), like patient.erased: the patients share-locked
    # before the requests are locked (queue_confirmation share-locks them again).
    composing.patients_of(session, request_ids, lock=True)
    statuses = dict(
        session.execute(
            select(PlacementRequest.id, PlacementRequest.status)
            .where(PlacementRequest.id.in_(list(request_ids)))
            .order_by(PlacementRequest.id)
            # Locked (in id order) so that a cancellation waits until the confirmation is
            # queued, or is seen here.
            .with_for_update()
        ).all()
    )
    for index, request_id in enumerate(request_ids):
        status = statuses[request_id]
        if status in NOT_CONFIRMABLE:
            raise Rejected(
                f"command.placement_request_ids[{index}]: the request is {status.value}",
                command_id,
            )
    queued = []
    for request_id in request_ids:
        confirmation = queue_confirmation(
            session, therapist, request_id, now, settings, in_reply_to=original
        )
        if confirmation is not None:
            queued.append(confirmation)
    return queued


def requests_still_pending(
    session: Session, request_ids: Iterable[int], *, lock: bool = False
) -> set[int]:
    """Those of ``request_ids`` still open or in progress.

    ``lock``: share-locked until the booking commits, in id order (so that bookings never
    deadlock). A status change locks its request before it withdraws the request from
    calls (``calls.withdraw_request_from_calls``): it waits for a booking that read the
    request as pending, and then sees and cancels its call; or the booking waits for the
    change and no longer reads the request as pending.
    """
    ids = sorted(set(request_ids))
    if not ids:
        return set()
    query = (
        select(PlacementRequest.id)
        .where(PlacementRequest.id.in_(ids))
        .where(PlacementRequest.status.in_(PENDING_REQUEST_STATUSES))
    )
    if lock:
        query = query.order_by(PlacementRequest.id).with_for_update(read=True)
    return set(session.scalars(query))
