"""Which emails wait for a follow-up call, and booking them: the follow-up check, the
queue, and why a therapist cannot be called."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from collections.abc import Sequence

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session, defer, selectinload

from comms_tasks.calls.scheduling import MARK_PER_STATEMENT, Booking, KnownCalls
from comms_tasks.contracts.published import CallUnschedulablePayload
from comms_tasks.emails import composing, requested_emails
from comms_tasks.events.outbox import record_events
from comms_tasks.models import (
    Email,
    EmailBatch,
    EmailStatus,
    EmailTemplate,
    PhoneCall,
    Therapist,
    TherapistStatus,
)
from comms_tasks.rules import batching, office_hours
from comms_tasks.settings import Settings


def follow_up_due_before(now: dt.datetime, settings: Settings) -> dt.datetime:
    """Emails sent before this instant are due for a follow-up at ``now``.

    Days are local calendar days: an email sent on local day D is due from the
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
    pending = requested_emails.requests_still_pending(
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
    return {request_id for request_id, patient in patients.items() if composing.is_erased(patient)}


def _why_not_callable(therapist: Therapist | None) -> str | None:
    if therapist is None or therapist.deleted_at is not None:
        return "the therapist is no longer known"
    if therapist.status is not TherapistStatus.ACTIVE:
        return f"the therapist's status is {therapist.status.value}"
    if not therapist.phone:
        return "no phone number"
    if not office_hours.parse_availability(therapist.phone_availability):
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
    composing.queue_emails(session, drafts, settings=settings, now=now)
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
