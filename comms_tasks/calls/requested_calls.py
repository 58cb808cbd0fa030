"""Calls other services ask for (``comms.schedule_call``): at an explicit time or in the
next free slot, for requests still pending, never twice for one of them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from comms_tasks.calls import follow_up
from comms_tasks.calls.scheduling import Booking, holidays_for, slot_rules
from comms_tasks.contracts import Rejected, received
from comms_tasks.emails import requested_emails
from comms_tasks.inbound import checks
from comms_tasks.models import (
    PhoneCall,
    PhoneCallBatch,
    PhoneCallStatus,
    PlacementRequest,
    Therapist,
    TherapistStatus,
)
from comms_tasks.rules import office_hours
from comms_tasks.rules.slots import BookedCalls, first_free_slot
from comms_tasks.settings import Settings


def schedule_requested_call(
    session: Session, command: received.ScheduleCall, now: dt.datetime, settings: Settings
) -> PhoneCall:
    """``comms.schedule_call``: at the given time, or in the first free slot.

    An explicit time must be a slot the search could offer (on the grid, after the lead
    time, not on a holiday, inside the therapist's availability, free), except that it may
    lie beyond the horizon. Requests already in a scheduled call are not booked again: a
    command that asks for what that call already is (the same requests, its time or any)
    is served by it; any other is rejected.
    """
    command_id = str(command.command_id)
    therapist = checks.known_therapist(session, command.therapist_id, command_id)
    if therapist.status is not TherapistStatus.ACTIVE:
        # As for follow-up calls (_why_not_callable): only active therapists are called.
        raise Rejected(
            f"command.therapist_id: the therapist's status is {therapist.status.value}",
            command_id,
        )
    if not therapist.phone:
        raise Rejected("command.therapist_id: the therapist has no phone number", command_id)
    request_ids = list(command.placement_request_ids)
    checks.check_requests_of(session, therapist.id, request_ids, command_id)
    start = None
    if command.at is not None:
        start = command.at.astimezone(dt.UTC)
        _check_explicit_time(therapist, start, now, settings, command_id)
    # Any time, also beyond the horizon: the calls around it are what it must fit.
    try:
        booking = Booking.start(session, settings, now, since=start)
    except OverflowError:
        raise Rejected("command.at: lies too far ahead", command_id) from None
    # After the booking lock, like every booking: requests, then calls (lock order).
    _check_still_pending(session, request_ids, command_id)
    existing = _live_call_about(session, request_ids, start, command_id)
    if existing is not None:
        return existing
    if start is None:
        start = booking.find_slot(therapist)
        if start is None:
            raise Rejected(
                f"command.at: no free slot within {settings.call_horizon_days} days", command_id
            )
    elif not booking.is_free(therapist.id, start):
        raise Rejected("command.at: the therapist or the operators are busy then", command_id)
    call = booking.book(
        therapist,
        start,
        request_ids,
        dedup_key=f"command:{command_id}",
        notes=command.notes,
    )
    booking.record()
    return call


def _check_explicit_time(
    therapist: Therapist, start: dt.datetime, now: dt.datetime, settings: Settings, command_id: str
) -> None:
    """An explicit ``at`` is a slot of the therapist's, or the command is rejected."""
    rules = slot_rules(settings)
    if start <= now:
        raise Rejected("command.at: lies in the past", command_id)
    local = start.astimezone(rules.zone)
    since_midnight = local.replace(tzinfo=None) - dt.datetime.combine(local.date(), dt.time.min)
    if since_midnight % rules.block:
        minutes = rules.block // dt.timedelta(minutes=1)
        raise Rejected(
            f"command.at: not on the {minutes}-minute grid of local time ({local:%H:%M:%S})",
            command_id,
        )
    if start < now + rules.lead_time:
        minutes = rules.lead_time // dt.timedelta(minutes=1)
        raise Rejected(f"command.at: less than {minutes} minutes ahead", command_id)
    holidays = holidays_for(rules.holiday_state)
    if local.date() in holidays:
        raise Rejected(f"command.at: {local.date()} is a public holiday", command_id)
    # The search's own predicate, without other calls: is ``start`` a slot of the windows?
    try:
        slot = first_free_slot(
            therapist.id,
            office_hours.parse_availability(therapist.phone_availability),
            BookedCalls(rules.block),
            now,
            rules,
            holidays,
            not_before=start,
            horizon_from=start,
        )
    except OverflowError:
        raise Rejected("command.at: lies too far ahead", command_id) from None
    if slot != start:
        raise Rejected("command.at: outside the therapist's phone availability", command_id)


def _check_still_pending(session: Session, request_ids: Sequence[int], command_id: str) -> None:
    erased = follow_up.erased_requests(session, request_ids)
    pending = requested_emails.requests_still_pending(session, request_ids, lock=True)
    for index, request_id in enumerate(request_ids):
        if request_id in erased:
            raise Rejected(
                f"command.placement_request_ids[{index}]: the request's patient was erased",
                command_id,
            )
        if request_id not in pending:
            status = session.scalar(
                select(PlacementRequest.status).where(PlacementRequest.id == request_id)
            )
            shown = status.value if status is not None else "unknown"
            raise Rejected(
                f"command.placement_request_ids[{index}]: the request is {shown}", command_id
            )


def _live_call_about(
    session: Session, request_ids: Sequence[int], start: dt.datetime | None, command_id: str
) -> PhoneCall | None:
    """The scheduled call that already is what the command asks for, if any.

    Any other scheduled call about one of the requests rejects the command: a request is
    discussed in one live call at a time.
    """
    rows = session.execute(
        select(PhoneCallBatch.placement_request_id, PhoneCall.id)
        .join(PhoneCall, PhoneCall.id == PhoneCallBatch.phone_call_id)
        .where(PhoneCallBatch.placement_request_id.in_(request_ids))
        .where(PhoneCall.status == PhoneCallStatus.SCHEDULED)
        .order_by(PhoneCall.id)
    ).all()
    if not rows:
        return None
    call_of = {request_id: call_id for request_id, call_id in rows}
    call_ids = sorted(set(call_of.values()))
    if len(call_ids) == 1 and set(call_of) == set(request_ids):
        call = session.get_one(PhoneCall, call_ids[0])
        same_requests = {batch.placement_request_id for batch in call.batches} == set(request_ids)
        if same_requests and (start is None or call.scheduled_at == start):
            return call
    for index, request_id in enumerate(request_ids):
        if request_id in call_of:
            raise Rejected(
                f"command.placement_request_ids[{index}]: request {request_id} is already "
                f"in scheduled call {call_of[request_id]}",
                command_id,
            )
    raise AssertionError("unreachable")  # pragma: no cover - a request above is in a call
