"""Follow-up phone calls: who gets one, when, and what a call's outcome changes.

Functions take the session and never commit. Booking is serialized: every transaction
that books calls first takes :func:`lock_booking` (a PostgreSQL advisory lock; SQLite
serializes writers anyway), then reads the live calls into a :class:`BookedCalls` index,
so the operator capacity per 5-minute block holds across workers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections import defaultdict
from collections.abc import Sequence

from sqlalchemy import exists, func, select, text, update
from sqlalchemy.orm import Session, defer, selectinload

from comms_tasks.contracts import received
from comms_tasks.contracts.published import (
    CallCompletedPayload,
    CallFailedPayload,
    CallScheduledPayload,
    CallUnschedulablePayload,
)
from comms_tasks.db import insert_rows
from comms_tasks.inbound.inbox import Rejected
from comms_tasks.models import (
    Email,
    EmailBatch,
    EmailStatus,
    EmailTemplate,
    PhoneCall,
    PhoneCallBatch,
    PhoneCallStatus,
    PlacementRequest,
    ResponseOutcome,
    Therapist,
    TherapistStatus,
)
from comms_tasks.events.outbox import record_event, record_events
from comms_tasks.settings import Settings
from comms_tasks.rules.slots import BookedCalls, Holidays, SlotRules, first_free_slot, parse_availability
from comms_tasks.rules import batching
from comms_tasks.emails import email_rules as email_rules, composing, answers
import comms_tasks.inbound.checks

# A call that was not answered is tried again, up to this many attempts in all.
MAX_CALL_ATTEMPTS = 3
# Any constant works; it only has to be the same for every process booking calls.
BOOKING_LOCK_KEY = 0x636F6D6D73  # "comms"
# Emails marked as waiting for a call per UPDATE statement (bounded IN lists).
MARK_PER_STATEMENT = 5_000


def slot_rules(settings: Settings) -> SlotRules:
    return SlotRules(
        zone=settings.zone,
        lead_time=dt.timedelta(minutes=settings.call_lead_time_minutes),
        horizon=dt.timedelta(days=settings.call_horizon_days),
        block=dt.timedelta(minutes=settings.call_slot_minutes),
        duration=dt.timedelta(minutes=settings.call_duration_minutes),
        calls_per_slot=settings.calls_per_slot,
        holiday_state=settings.holiday_state,
    )


@functools.cache
def holidays_for(state: str | None) -> Holidays:
    return Holidays(state)


def lock_booking(session: Session) -> None:
    """Serialize booking across workers until this transaction ends."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": BOOKING_LOCK_KEY})


# How long a task may keep extending the calls it read instead of reading them again.
KNOWN_CALLS_VALID = dt.timedelta(hours=1)


@dataclasses.dataclass
class KnownCalls:
    """The live calls one task has read, kept across its booking transactions.

    Every call is inserted under the booking lock, so call ids grow in the order calls
    become visible: a later transaction of the task reads only the calls after
    ``last_id`` (those other workers booked meanwhile). A call cancelled meanwhile stays
    in the index, so its slot is not offered again by this task: never an overbooking.
    """

    booked: BookedCalls
    last_id: int
    read_at: dt.datetime

    def usable_at(self, now: dt.datetime) -> bool:
        return self.read_at <= now < self.read_at + KNOWN_CALLS_VALID


def read_calls(
    session: Session,
    now: dt.datetime,
    settings: Settings,
    known: KnownCalls | None = None,
    *,
    since: dt.datetime | None = None,
) -> KnownCalls:
    """Every live call from now to the end of the horizon, indexed; or those after ``known``.

    With ``since`` (a booking at or after a later instant: an explicit time, a late
    ``retry_after``), the calls from ``since`` to a horizon after it, in a fresh index.
    """
    rules = slot_rules(settings)
    last_id = session.scalar(select(func.max(PhoneCall.id))) or 0
    query = (
        select(PhoneCall.therapist_id, PhoneCall.scheduled_at, PhoneCall.duration_minutes)
        .where(PhoneCall.status == PhoneCallStatus.SCHEDULED)
        .where(PhoneCall.id <= last_id)
    )
    if known is not None and known.usable_at(now) and since is None:
        query = query.where(PhoneCall.id > known.last_id)
    else:
        # The window covers every booking this index may serve while it is usable.
        window_start = now if since is None else max(now, since)
        window_end = window_start + rules.horizon + rules.duration + KNOWN_CALLS_VALID
        query = query.where(PhoneCall.scheduled_at >= window_start - rules.duration).where(
            PhoneCall.scheduled_at <= window_end
        )
        known = KnownCalls(BookedCalls(rules.block), last_id=0, read_at=now)
    for therapist_id, start, minutes in session.execute(query):
        known.booked.add(therapist_id, start, start + dt.timedelta(minutes=minutes))
    known.last_id = last_id
    return known


@dataclasses.dataclass
class Booking:
    """The state one booking transaction works with."""

    session: Session
    settings: Settings
    now: dt.datetime
    known: KnownCalls
    rules: SlotRules
    # Calls added since the last record(): their ids and events come with the next one.
    _unrecorded: list[tuple[PhoneCall, list[int]]] = dataclasses.field(default_factory=list)

    @classmethod
    def start(
        cls,
        session: Session,
        settings: Settings,
        now: dt.datetime,
        known: KnownCalls | None = None,
        *,
        since: dt.datetime | None = None,
    ) -> Booking:
        """Take the booking lock and read the calls (only the new ones, given ``known``).

        ``since``: the booking is at or after this instant, which may lie beyond the
        horizon; the calls around it are read instead of those from now.
        """
        lock_booking(session)
        known = read_calls(session, now, settings, known, since=since)
        return cls(session, settings, now, known, slot_rules(settings))

    @property
    def booked(self) -> BookedCalls:
        return self.known.booked

    def find_slot(
        self,
        therapist: Therapist,
        not_before: dt.datetime | None = None,
        *,
        horizon_from: dt.datetime | None = None,
    ) -> dt.datetime | None:
        """The first free slot; within the horizon from now, or from ``horizon_from``.

        A search from ``horizon_from`` needs the booking started with ``since`` at or
        before it, so that the calls of its range are known.
        """
        availability = parse_availability(therapist.phone_availability)
        if not therapist.phone or not availability:
            return None
        return first_free_slot(
            therapist.id,
            availability,
            self.booked,
            self.now,
            self.rules,
            holidays_for(self.rules.holiday_state),
            not_before=not_before,
            horizon_from=horizon_from,
        )

    def is_free(self, therapist_id: int, start: dt.datetime) -> bool:
        end = start + self.rules.duration
        return self.booked.has_room(therapist_id, start, end, self.rules.calls_per_slot)

    def book(
        self,
        therapist: Therapist,
        start: dt.datetime,
        request_ids: Sequence[int],
        *,
        dedup_key: str,
        email_id: int | None = None,
        previous: PhoneCall | None = None,
        notes: str | None = None,
    ) -> PhoneCall:
        local = start.astimezone(self.settings.zone)
        duration = self.settings.call_duration_minutes
        call = PhoneCall(
            therapist_id=therapist.id,
            email_id=email_id,
            previous_call_id=previous.id if previous else None,
            attempt=previous.attempt + 1 if previous else 1,
            dedup_key=dedup_key,
            scheduled_date=local.date(),
            scheduled_time=local.time().replace(tzinfo=None),
            scheduled_at=start,
            duration_minutes=duration,
            status=PhoneCallStatus.SCHEDULED,
            notes=notes,
        )
        self.session.add(call)
        self.booked.add(therapist.id, start, start + dt.timedelta(minutes=duration))
        self._unrecorded.append((call, list(request_ids)))
        return call

    def record(self) -> None:
        """Write the calls booked so far and their requests, and record ``call.scheduled``.

        One flush for the calls (their ids), one statement for all their request rows and
        one for all their events.
        """
        if not self._unrecorded:
            return
        self.session.flush()
        for call, _ in self._unrecorded:
            # Ours are in the index already; read_calls must not add them again.
            self.known.last_id = max(self.known.last_id, call.id)
        insert_rows(
            self.session,
            PhoneCallBatch,
            [
                {"phone_call_id": call.id, "placement_request_id": request_id, "priority": rank}
                for call, request_ids in self._unrecorded
                for rank, request_id in enumerate(request_ids, start=1)
            ],
        )
        record_events(
            self.session,
            [
                CallScheduledPayload(
                    call_id=call.id,
                    therapist_id=call.therapist_id,
                    scheduled_at=call.scheduled_at,
                    placement_request_ids=request_ids,
                )
                for call, request_ids in self._unrecorded
            ],
            occurred_at=self.now,
        )
        for call, _ in self._unrecorded:
            # The rows were written around the ORM: the next access reads them.
            self.session.expire(call, ["batches"])
        self._unrecorded.clear()


# --- the follow-up check ------------------------------------------------------------------


def follow_up_due_before(now: dt.datetime, settings: Settings) -> dt.datetime:
    """Emails sent before this instant are due for a follow-up at ``now``.

    Days are local calendar days (SPEC §5): an email sent on local day D is due from the
    start of day D + ``follow_up_after_days``, whatever minute it left.
    """
    today = batching.local_day(now, settings.zone)
    first_day_not_due = today - dt.timedelta(days=settings.follow_up_after_days - 1)
    return batching.local_midnight(first_day_not_due, settings.zone)


def request_follow_up_calls(session: Session, now: dt.datetime, settings: Settings) -> int:
    """Mark unanswered emails (sent long enough ago) as waiting for a call; returns how many."""
    due_before = follow_up_due_before(now, settings)
    has_call = exists(select(PhoneCall.id).where(PhoneCall.email_id == Email.id))
    # Ids only: the emails' bodies stay in the database.
    email_ids = list(
        session.scalars(
            select(Email.id)
            .where(Email.template.in_(composing.ASKING_TEMPLATES))
            .where(Email.status == EmailStatus.SENT)
            .where(Email.sent_at < due_before)
            .where(Email.response_received.is_(False))
            .where(Email.follow_up_required.is_(False))
            .where(Email.call_requested_at.is_(None))
            .where(Email.follow_up_settled_at.is_(None))
            .where(~has_call)
            .with_for_update(skip_locked=True)
        )
    )
    for start in range(0, len(email_ids), MARK_PER_STATEMENT):
        session.execute(
            update(Email)
            .where(Email.id.in_(email_ids[start : start + MARK_PER_STATEMENT]))
            .values(call_requested_at=now)
            .execution_options(synchronize_session=False)
        )
    return len(email_ids)


def waiting_for_call(session: Session, limit: int | None = None) -> list[int]:
    """Emails marked for a call (by the follow-up check or a bounce) that have no call
    yet, oldest first (ids only; at most ``limit``)."""
    has_call = exists(select(PhoneCall.id).where(PhoneCall.email_id == Email.id))
    return list(
        session.scalars(
            select(Email.id)
            .where(Email.call_requested_at.is_not(None))
            .where(Email.follow_up_settled_at.is_(None))
            .where(Email.follow_up_required.is_(False))
            .where(Email.response_received.is_(False))
            .where(~has_call)
            .order_by(Email.call_requested_at, Email.id)
            .limit(limit)
        )
    )


@dataclasses.dataclass
class ScheduleReport:
    scheduled: int = 0
    unschedulable: int = 0
    nothing_left: int = 0
    # The calls read and booked, for the task's next chunk.
    known: KnownCalls | None = None


def schedule_follow_ups(
    session: Session,
    email_ids: Sequence[int],
    now: dt.datetime,
    settings: Settings,
    known: KnownCalls | None = None,
) -> ScheduleReport:
    """One call per waiting email, in the first free slot; else a reminder and a flag.

    Reads the emails (without bodies), their requests, calls and therapists in five
    queries, however many emails; the calls are written in one flush.
    """
    booking = Booking.start(session, settings, now, known)
    report = ScheduleReport(known=booking.known)
    # The patients first (lock order; an email's requests never change once it is sent).
    erased = erased_requests(
        session,
        list(
            session.scalars(
                select(EmailBatch.placement_request_id)
                .where(EmailBatch.email_id.in_(email_ids))
                .where(EmailBatch.included)
            )
        ),
    )
    # Locked in id order, like an answer locks its email (record_response) before it
    # cancels the email's calls: an answer recorded meanwhile waits for this transaction
    # and then cancels the call booked here, or this one waits and sees the answer.
    emails = {
        email.id: email
        for email in session.scalars(
            select(Email)
            .where(Email.id.in_(email_ids))
            .order_by(Email.id)
            .options(defer(Email.body_html), defer(Email.body_text), selectinload(Email.batches))
            .with_for_update(of=Email)
        )
    }
    with_call = set(
        session.scalars(select(PhoneCall.email_id).where(PhoneCall.email_id.in_(email_ids)))
    )
    included = {
        email.id: [batch.placement_request_id for batch in email.batches if batch.included]
        for email in emails.values()
    }
    pending = answers.requests_still_pending(
        session, [request_id for ids in included.values() for request_id in ids], lock=True
    )
    therapist_ids = {email.therapist_id for email in emails.values()}
    therapists = {
        therapist.id: therapist
        for therapist in session.scalars(select(Therapist).where(Therapist.id.in_(therapist_ids)))
    }
    no_call: list[NoCall] = []
    for email_id in email_ids:
        email = emails.get(email_id)
        if email is None or email.response_received or email.follow_up_required:
            continue
        if email.follow_up_settled_at is not None:
            continue
        if email.id in with_call:
            continue
        request_ids = [
            request_id
            for request_id in included[email.id]
            if request_id in pending and request_id not in erased
        ]
        if not request_ids:
            # Every request was decided, withdrawn or its patient erased meanwhile: nothing
            # to call about, now or later. Settled for good, so that the check does not take
            # it up again.
            email.follow_up_settled_at = now
            report.nothing_left += 1
            continue
        therapist = therapists.get(email.therapist_id)
        reason = _why_not_callable(therapist)
        start = booking.find_slot(therapist) if therapist and reason is None else None
        if therapist is not None and start is not None:
            booking.book(
                therapist, start, request_ids, dedup_key=f"follow_up:{email.id}", email_id=email.id
            )
            report.scheduled += 1
            continue
        no_call.append(
            NoCall(
                email,
                therapist,
                request_ids,
                reason or f"no free slot within {settings.call_horizon_days} days",
            )
        )
        report.unschedulable += 1
    booking.record()
    unschedulable(session, no_call, now, settings)
    return report


def erased_requests(session: Session, request_ids: Sequence[int]) -> set[int]:
    """Those of ``request_ids`` whose patient was erased; their patients share-locked.

    Like the emails' share lock (``emails.patients_of``), on PostgreSQL, in patient id
    order, until the transaction ends, and taken before any email, request or call (lock
    order: booking lock -> patients -> emails -> requests -> calls): ``patient.erased``
    holds the patient ``FOR UPDATE`` before it touches the rest, so a booking waits for an
    erasure under way and leaves its patient out, or the erasure waits for the booking and
    then finds its call. Erased patients are never called about (as the batch never asks).
    """
    patients = composing.patients_of(session, request_ids, lock=True)
    return {
        request_id for request_id, patient in patients.items() if composing.is_erased(patient)
    }


def _why_not_callable(therapist: Therapist | None) -> str | None:
    if therapist is None or therapist.deleted_at is not None:
        return "the therapist is no longer known"
    if therapist.status is not TherapistStatus.ACTIVE:
        return f"the therapist's status is {therapist.status.value}"
    if not therapist.phone:
        return "no phone number"
    if not parse_availability(therapist.phone_availability):
        return "no phone availability"
    return None


@dataclasses.dataclass(frozen=True)
class NoCall:
    """An email that gets no follow-up call, and why."""

    email: Email
    therapist: Therapist | None
    request_ids: Sequence[int]
    reason: str


def unschedulable(
    session: Session, no_call: Sequence[NoCall], now: dt.datetime, settings: Settings
) -> None:
    """No call: a reminder email once, the email flagged for manual follow-up, an event.

    A handful of statements however many emails: one lookup of the reminders already
    queued, one UPDATE per reason for the flags, one
    :func:`~comms_tasks.emails.queue_emails` for the new reminders, one statement for the
    events.
    """
    if not no_call:
        return
    dedup_keys = {item.email.id: f"reminder:{item.email.id}" for item in no_call}
    already = set(
        session.scalars(select(Email.dedup_key).where(Email.dedup_key.in_(dedup_keys.values())))
    )
    flagged: dict[str, list[int]] = defaultdict(list)
    drafts = []
    for item in no_call:
        flagged[f"no follow-up call: {item.reason}"].append(item.email.id)
        dedup_key = dedup_keys[item.email.id]
        therapist = item.therapist
        if dedup_key in already or therapist is None or not therapist.email:
            continue
        drafts.append(
            composing.Draft(
                therapist,
                EmailTemplate.FOLLOW_UP,
                item.request_ids,
                dedup_key,
                in_reply_to=item.email,
            )
        )
    # One UPDATE per reason: a flush of the objects would write one row per round trip.
    for notes, email_ids in flagged.items():
        session.execute(
            update(Email)
            .where(Email.id.in_(email_ids))
            .values(follow_up_required=True, follow_up_notes=notes)
            .execution_options(synchronize_session=False)
        )
    for item in no_call:
        session.expire(item.email, ["follow_up_required", "follow_up_notes"])
    email_rules.queue_emails(session, drafts, settings=settings, now=now)
    record_events(
        session,
        [
            CallUnschedulablePayload(
                email_id=item.email.id, therapist_id=item.email.therapist_id, reason=item.reason
            )
            for item in no_call
        ],
        occurred_at=now,
    )


# --- commands -----------------------------------------------------------------------------


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
    therapist = comms_tasks.inbound.checks.known_therapist(session, command.therapist_id, command_id)
    if therapist.status is not TherapistStatus.ACTIVE:
        # As for follow-up calls (_why_not_callable): only active therapists are called.
        raise Rejected(
            f"command.therapist_id: the therapist's status is {therapist.status.value}",
            command_id,
        )
    if not therapist.phone:
        raise Rejected("command.therapist_id: the therapist has no phone number", command_id)
    request_ids = list(command.placement_request_ids)
    comms_tasks.inbound.checks.check_requests_of(session, therapist.id, request_ids, command_id)
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
            parse_availability(therapist.phone_availability),
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
    erased = erased_requests(session, request_ids)
    pending = answers.requests_still_pending(session, request_ids, lock=True)
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
    erased = erased_requests(session, call_requests)
    if email_id is not None:
        session.get(Email, email_id, with_for_update=True, populate_existing=True)
    if command.status == "failed":
        pending = answers.requests_still_pending(session, call_requests, lock=True) - erased
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
    reason = _why_not_callable(therapist)
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
        pending = answers.requests_still_pending(
            session, [batch.placement_request_id for batch in call.batches]
        )
        if not pending:
            call.status = PhoneCallStatus.CANCELLED
            call.notes = "cancelled: all its requests were withdrawn"
