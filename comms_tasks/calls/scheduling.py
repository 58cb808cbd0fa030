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
from collections.abc import Sequence

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from comms_tasks.contracts.published import CallScheduledPayload
from comms_tasks.db import insert_rows
from comms_tasks.events.outbox import record_events
from comms_tasks.models import PhoneCall, PhoneCallBatch, PhoneCallStatus, Therapist
from comms_tasks.rules import office_hours
from comms_tasks.rules.slots import BookedCalls, SlotRules, first_free_slot
from comms_tasks.settings import Settings

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
def holidays_for(state: str | None) -> office_hours.Holidays:
    return office_hours.Holidays(state)


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
        availability = office_hours.parse_availability(therapist.phone_availability)
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


# --- commands -----------------------------------------------------------------------------
