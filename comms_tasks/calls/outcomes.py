"""A call's outcome: completed (outcomes per request, confirmations), failed (tried
again or a reminder email), and requests withdrawn from calls."""

from __future__ import annotations

import dataclasses
import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from comms_tasks.calls import follow_up
from comms_tasks.calls.scheduling import MAX_CALL_ATTEMPTS, Booking, lock_booking
from comms_tasks.contracts import Rejected, received
from comms_tasks.contracts.published import CallCompletedPayload, CallFailedPayload
from comms_tasks.emails import answers, requested_emails
from comms_tasks.events.outbox import record_event
from comms_tasks.models import (
    Email,
    PhoneCall,
    PhoneCallBatch,
    PhoneCallStatus,
    ResponseOutcome,
    Therapist,
)
from comms_tasks.settings import Settings


@dataclasses.dataclass(frozen=True)
class CallOutcomeResult:
    confirmations: list[int]
    next_call_id: int | None = None


def record_call_outcome(
    session: Session, command: received.RecordCallOutcome, now: dt.datetime, settings: Settings
) -> CallOutcomeResult:
    """Apply a call's outcome.

    Locks in the order every writer uses (booking lock -> emails -> requests -> calls), so
    that an answer to the call's email (email, then its calls) or a status change of its
    requests (request, then its calls) never deadlocks with it: a failed call, which may
    book its retry, takes the booking lock, then its email, then share-locks its pending
    requests, then the call. A call's email and requests never change, so they are read
    before the call is locked.
    """
    command_id = str(command.command_id)
    found = session.execute(
        select(PhoneCall.id, PhoneCall.email_id).where(PhoneCall.id == command.call_id)
    ).first()
    if found is None:
        raise Rejected("command.call_id: unknown call", command_id)
    email_id = found.email_id
    call_requests = list(
        session.scalars(
            select(PhoneCallBatch.placement_request_id).where(
                PhoneCallBatch.phone_call_id == command.call_id
            )
        )
    )
    pending: set[int] = set()
    if command.status == "failed":
        lock_booking(session)
    # The patients before the email (lock order): a retry leaves erased patients out, and
    # an accepted outcome's confirmation share-locks them again without a deadlock.
    erased = follow_up.erased_requests(session, call_requests)
    if email_id is not None:
        session.get(Email, email_id, with_for_update=True, populate_existing=True)
    if command.status == "failed":
        pending = (
            requested_emails.requests_still_pending(session, call_requests, lock=True) - erased
        )
    call = session.get(PhoneCall, command.call_id, with_for_update=True, populate_existing=True)
    if call is None:
        raise Rejected("command.call_id: unknown call", command_id)
    if call.status is not PhoneCallStatus.SCHEDULED:
        raise Rejected(f"command.call_id: the call is already {call.status.value}", command_id)
    batches = {batch.placement_request_id: batch for batch in call.batches}
    for index, item in enumerate(command.requests):
        if item.placement_request_id not in batches:
            raise Rejected(
                f"command.requests[{index}].placement_request_id: not part of this call",
                command_id,
            )
    local = command.occurred_at.astimezone(settings.zone)
    call.actual_date = local.date()
    call.actual_time = local.time().replace(tzinfo=None, microsecond=0)
    # A call whose text was redacted (its patient erased) keeps none recorded later.
    keep_text = call.text_redacted_at is None
    call.outcome = command.outcome if keep_text else None
    if command.notes is not None and keep_text:
        call.notes = command.notes
    call.retry_after = command.retry_after
    if command.status == "cancelled":
        call.status = PhoneCallStatus.CANCELLED
        return CallOutcomeResult([])
    if command.status == "completed":
        return _completed(session, call, command, batches, now, settings)
    return _failed(session, call, command, pending, now, settings)


def _completed(
    session: Session,
    call: PhoneCall,
    command: received.RecordCallOutcome,
    batches: dict[int, PhoneCallBatch],
    now: dt.datetime,
    settings: Settings,
) -> CallOutcomeResult:
    call.status = PhoneCallStatus.COMPLETED
    record_event(
        session,
        CallCompletedPayload(call_id=call.id, therapist_id=call.therapist_id),
        occurred_at=now,
    )
    therapist = session.get(Therapist, call.therapist_id)
    confirmations = []
    for item in command.requests:
        batch = batches[item.placement_request_id]
        batch.discussed = item.discussed
        batch.outcome = ResponseOutcome(item.outcome) if item.outcome else None
        batch.follow_up_notes = item.notes if call.text_redacted_at is None else None
        batch.follow_up_required = item.outcome == ResponseOutcome.NEEDS_FOLLOW_UP
        if item.outcome is None:
            continue
        confirmation = answers.record_outcome(
            session,
            call.therapist_id,
            therapist,
            item.placement_request_id,
            ResponseOutcome(item.outcome),
            via="call",
            source_id=call.id,
            now=now,
            settings=settings,
        )
        if confirmation is not None:
            confirmations.append(confirmation)
    return CallOutcomeResult(confirmations)


def _failed(
    session: Session,
    call: PhoneCall,
    command: received.RecordCallOutcome,
    pending: set[int],
    now: dt.datetime,
    settings: Settings,
) -> CallOutcomeResult:
    """No answer: the next attempt, or manual follow-up.

    ``pending``: the call's requests still pending, share-locked by the caller (after the
    booking lock and the call's email, before the call).
    """
    call.status = PhoneCallStatus.FAILED
    next_call = None
    reason = f"not answered {call.attempt} times"
    if call.attempt < MAX_CALL_ATTEMPTS:
        next_call, reason = _retry(session, call, command.retry_after, pending, now, settings)
    if next_call is None:
        call.follow_up_required = True
        call.follow_up_notes = f"manual follow-up: {reason}"
        if call.email_id is not None:
            email = session.get(Email, call.email_id)
            if email is not None:
                email.follow_up_required = True
                email.follow_up_notes = call.follow_up_notes
    record_event(
        session,
        CallFailedPayload(
            call_id=call.id,
            therapist_id=call.therapist_id,
            attempt=call.attempt,
            next_call_id=next_call.id if next_call else None,
        ),
        occurred_at=now,
    )
    return CallOutcomeResult([], next_call.id if next_call else None)


def _retry(
    session: Session,
    call: PhoneCall,
    retry_after: dt.date | None,
    pending: set[int],
    now: dt.datetime,
    settings: Settings,
) -> tuple[PhoneCall | None, str]:
    """The next attempt: on ``retry_after`` or later, else from the next local day.

    ``pending`` are the requests locked as pending (see :func:`record_call_outcome`): a
    withdrawal that comes meanwhile waits and then cancels the call booked here.
    """
    therapist = session.get(Therapist, call.therapist_id)
    reason = follow_up._why_not_callable(therapist)
    if therapist is None or reason is not None:
        return None, reason or "the therapist is no longer known"
    email = session.get(Email, call.email_id) if call.email_id is not None else None
    if email is not None and email.response_received:
        return None, "the email was answered"
    request_ids = [
        b.placement_request_id for b in call.batches if b.placement_request_id in pending
    ]
    if not request_ids:
        return None, "no request is still open"
    zone = settings.zone
    first_day = retry_after or (now.astimezone(zone).date() + dt.timedelta(days=1))
    not_before = dt.datetime.combine(first_day, dt.time(0, 0), tzinfo=zone).astimezone(dt.UTC)
    # The search lasts a horizon from its first day, however far ahead ``retry_after`` is.
    try:
        booking = Booking.start(session, settings, now, since=not_before)
        start = booking.find_slot(therapist, not_before=not_before, horizon_from=not_before)
    except OverflowError:
        return None, f"retry_after {first_day:%Y-%m-%d} lies too far ahead"
    if start is None:
        return None, (
            f"no free slot within {settings.call_horizon_days} days from {first_day:%Y-%m-%d}"
        )
    next_call = booking.book(
        therapist,
        start,
        request_ids,
        dedup_key=f"retry:{call.id}",
        email_id=call.email_id,
        previous=call,
    )
    booking.record()
    return next_call, ""


def withdraw_request_from_calls(session: Session, request_id: int) -> None:
    """A request that left open/in_progress: a scheduled call with nothing left is cancelled."""
    calls = session.scalars(
        select(PhoneCall)
        .join(PhoneCallBatch, PhoneCallBatch.phone_call_id == PhoneCall.id)
        .where(PhoneCallBatch.placement_request_id == request_id)
        .where(PhoneCall.status == PhoneCallStatus.SCHEDULED)
        .order_by(PhoneCall.id)
        .with_for_update(of=PhoneCall)
    ).all()
    for call in calls:
        pending = requested_emails.requests_still_pending(
            session, [batch.placement_request_id for batch in call.batches]
        )
        if not pending:
            call.status = PhoneCallStatus.CANCELLED
            call.notes = "cancelled: all its requests were withdrawn"
