"""Calls booked beyond the usual horizon: an explicit ``at``, a late ``retry_after``.

On real PostgreSQL, through the commands as other services send them. Capacity is the
default, one call per 5-minute block.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from comms_tasks.calls.tasks import follow_up_check, schedule_calls
from comms_tasks.models import Email, PhoneCallStatus
from comms_tasks.settings import get_settings
from comms_tasks.task_names import RECORD_CALL_OUTCOME, SCHEDULE_CALL
from tests.calls.test_calls import (
    apply,
    calls_of,
    local_slot,
    now,
    outcome,
    schedule_command,
    sent_email,
)

BUSY = "dead_letter: command.at: the therapist or the operators are busy then"


def test_an_explicit_time_beyond_the_horizon_is_checked_against_the_calls_then(
    domain_db: Connection,
) -> None:
    sent_email(1, days_ago=1)
    sent_email(2, days_ago=1)
    at = local_slot(get_settings().call_horizon_days + 6)

    assert apply(SCHEDULE_CALL, schedule_command(1, at)) == "applied"
    assert apply(SCHEDULE_CALL, schedule_command(1, at, [11])) == BUSY  # the same therapist
    assert apply(SCHEDULE_CALL, schedule_command(2, at)) == BUSY  # the only operator
    overlapping = at + dt.timedelta(minutes=2)
    assert apply(SCHEDULE_CALL, schedule_command(2, overlapping)).startswith(
        "dead_letter: command.at: not on the 5-minute grid"
    )
    assert apply(SCHEDULE_CALL, schedule_command(2, at + dt.timedelta(minutes=5))) == "applied"

    booked = calls_of(domain_db)
    assert [(c.therapist_id, c.scheduled_at) for c in booked] == [
        (1, at),
        (2, at + dt.timedelta(minutes=5)),
    ]


def fail_with_retry_after(domain_db: Connection, therapist_id: int, day: dt.date) -> None:
    sent_email(therapist_id)
    follow_up_check()
    schedule_calls()
    [call] = [c for c in calls_of(domain_db) if c.therapist_id == therapist_id]
    command = outcome(call.id, "failed", retry_after=day.isoformat())
    assert apply(RECORD_CALL_OUTCOME, command) == "applied"


def test_a_retry_after_beyond_the_horizon_is_booked_within_a_horizon_from_that_day(
    domain_db: Connection,
) -> None:
    settings = get_settings()
    horizon = dt.timedelta(days=settings.call_horizon_days)
    later = (now() + horizon + dt.timedelta(days=6)).astimezone(settings.zone).date()

    fail_with_retry_after(domain_db, 7, later)
    # A second therapist asks for the same day: the first retry's call is counted.
    fail_with_retry_after(domain_db, 8, later)

    first_7, first_8 = (c for c in calls_of(domain_db) if c.attempt == 1)
    retry_7, retry_8 = (c for c in calls_of(domain_db) if c.attempt == 2)
    assert (first_7.status, first_8.status) == (PhoneCallStatus.FAILED, PhoneCallStatus.FAILED)
    assert not first_7.follow_up_required and not first_8.follow_up_required
    for retry in (retry_7, retry_8):
        assert retry.status is PhoneCallStatus.SCHEDULED
        assert later <= retry.scheduled_date <= later + horizon
    assert retry_7.scheduled_at != retry_8.scheduled_at
    assert abs(retry_7.scheduled_at - retry_8.scheduled_at) >= dt.timedelta(minutes=5)
    with Session(domain_db) as session:
        email = session.get(Email, first_7.email_id)
        assert email is not None and not email.follow_up_required


def test_a_retry_after_at_the_end_of_the_range_is_booked_and_beyond_it_refused(
    domain_db: Connection,
) -> None:
    """The contract's last day (2199-12-31) books; the calendar's last day is refused."""
    sent_email(9)
    follow_up_check()
    schedule_calls()
    [call] = calls_of(domain_db)
    too_far = outcome(call.id, "failed", retry_after=dt.date.max.isoformat())
    assert apply(RECORD_CALL_OUTCOME, too_far) == (
        "dead_letter: command.retry_after: must be between the years 1900 and 2199"
    )

    last_day = dt.date(2199, 12, 31)
    assert apply(
        RECORD_CALL_OUTCOME, outcome(call.id, "failed", retry_after=last_day.isoformat())
    ) == ("applied")
    [retry] = [c for c in calls_of(domain_db) if c.attempt == 2]
    assert retry.status is PhoneCallStatus.SCHEDULED
    horizon = dt.timedelta(days=get_settings().call_horizon_days)
    assert last_day <= retry.scheduled_date <= last_day + horizon
