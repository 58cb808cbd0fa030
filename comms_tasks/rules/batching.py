"""Pure rules of the weekly batch: who may be contacted, and which requests go together.

Plain values in, plain values out: no database, no clock. ``comms.batch_requests``,
``comms explain`` and ``comms preview`` all decide with these functions.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence

from comms_tasks.models.enums import EmailTemplate, TherapistStatus

SINGLE_REQUEST_TEMPLATE = EmailTemplate.INITIAL_CONTACT
SEVERAL_REQUESTS_TEMPLATE = EmailTemplate.BATCH_REQUEST


@dataclasses.dataclass(frozen=True)
class TherapistFacts:
    """What the contact rules need to know about one therapist, now."""

    therapist_id: int
    status: TherapistStatus
    has_email: bool
    deleted: bool = False
    # An email to them that is queued or being sent (it counts before it is sent).
    has_unsent_email: bool = False
    # When the most recent counting email to them was sent, if any.
    last_sent_at: dt.datetime | None = None
    # An email whose recipient the server refused for good at their current address,
    # with nothing sent there since: the address is undeliverable.
    refused_email_id: int | None = None
    # When an email to their current address bounced for good (read from the mailbox):
    # the address is undeliverable until the therapist service sends another.
    bounced_since: dt.datetime | None = None
    # Scheduled calls to them, by time (UTC).
    scheduled_calls: tuple[dt.datetime, ...] = ()


@dataclasses.dataclass(frozen=True)
class Contactability:
    contactable: bool
    reason: str | None = None
    # The first local day on which the blocking reason has lapsed, if it lapses by itself:
    # any batch run on that day or later may email them.
    contactable_from: dt.date | None = None


def contactability(
    facts: TherapistFacts,
    now: dt.datetime,
    *,
    contact_interval: dt.timedelta,
    call_window: dt.timedelta,
    zone: dt.tzinfo = dt.UTC,
) -> Contactability:
    """Whether the therapist may get a new batch email now, and if not, why and from when.

    Both limits count whole local calendar days in ``zone``, never instants: emailed on
    day D, contactable again on day D + ``contact_interval`` whatever minute the email
    left (so the weekly batch stays on its weekday, across clock changes too); a call on
    day C blocks the runs of day C and of the ``call_window`` - 1 days before it.
    """
    if facts.deleted:
        return Contactability(False, "deleted by the therapist service")
    if facts.status is not TherapistStatus.ACTIVE:
        return Contactability(False, f"status is {facts.status.value}")
    if not facts.has_email:
        return Contactability(False, "no email address")
    if facts.refused_email_id is not None:
        # Lapses only when the therapist service sends another address.
        return Contactability(
            False,
            f"its address was refused for good (email {facts.refused_email_id}): "
            "waiting for a different address from the therapist service",
        )
    if facts.bounced_since is not None:
        return Contactability(
            False,
            f"its address bounced for good on {local_day(facts.bounced_since, zone):%Y-%m-%d}: "
            "waiting for a different address from the therapist service",
        )
    if facts.has_unsent_email:
        return Contactability(False, "an email to them is queued and counts as this week's contact")
    today = local_day(now, zone)
    blocked_until: list[tuple[dt.date, str]] = []
    if facts.last_sent_at is not None:
        sent_on = local_day(facts.last_sent_at, zone)
        again_on = sent_on + dt.timedelta(days=contact_interval.days)
        if today < again_on:
            blocked_until.append(
                (
                    again_on,
                    f"emailed on {sent_on:%Y-%m-%d}, at most one email "
                    f"per {contact_interval.days} days",
                )
            )
    window_end = today + dt.timedelta(days=call_window.days)
    upcoming = [at for at in facts.scheduled_calls if today <= local_day(at, zone) < window_end]
    if upcoming:
        local_call = max(upcoming).astimezone(zone)
        blocked_until.append(
            (
                local_call.date() + dt.timedelta(days=1),
                f"a call is scheduled for {local_call:%Y-%m-%d %H:%M}",
            )
        )
    if blocked_until:
        until, reason = max(blocked_until)
        # The day named must be free of every later call too: one within the window of
        # that day moves it past the call's day (as the runs of those days would find).
        for at in sorted(facts.scheduled_calls):
            call_day = local_day(at, zone)
            if until <= call_day < until + dt.timedelta(days=call_window.days):
                until = call_day + dt.timedelta(days=1)
        return Contactability(False, reason, until)
    return Contactability(True)


def local_day(moment: dt.datetime, zone: dt.tzinfo) -> dt.date:
    return moment.astimezone(zone).date()


def local_midnight(day: dt.date, zone: dt.tzinfo) -> dt.datetime:
    """The instant (UTC) local ``day`` begins; where midnight is skipped, the first instant."""
    return dt.datetime.combine(day, dt.time(0, 0), tzinfo=zone).astimezone(dt.UTC)


@dataclasses.dataclass(frozen=True)
class OpenRequest:
    placement_request_id: int
    created_at: dt.datetime
    registered_on: dt.date | None


def batch_order(request: OpenRequest) -> tuple[bool, dt.date, dt.datetime, int]:
    """Oldest patient registration first (missing dates last), then request age, then id."""
    return (
        request.registered_on is None,
        request.registered_on or dt.date.max,
        request.created_at,
        request.placement_request_id,
    )


def select_batch(requests: Iterable[OpenRequest], limit: int) -> list[OpenRequest]:
    """The requests for this week's email, in the order they are asked about."""
    return sorted(requests, key=batch_order)[:limit]


def template_for(requests: Sequence[object]) -> EmailTemplate:
    if not requests:
        raise ValueError("a batch needs at least one request")
    return SINGLE_REQUEST_TEMPLATE if len(requests) == 1 else SEVERAL_REQUESTS_TEMPLATE
