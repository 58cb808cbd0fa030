"""Follow-up calls: ``comms.follow_up_check`` -> ``comms.schedule_calls``, and the commands
``comms.schedule_call`` and ``comms.record_call_outcome``."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from comms_tasks.app import app
from comms_tasks.calls import follow_up, outcomes, requested_calls, scheduling
from comms_tasks.contracts import received
from comms_tasks.db import transaction
from comms_tasks.emails.tasks import send_email, send_email_after_commit
from comms_tasks.inbound.runner import inbound_task
from comms_tasks.models.base import utcnow
from comms_tasks.settings import get_settings
from comms_tasks.task_names import (
    FOLLOW_UP_CHECK,
    RECORD_CALL_OUTCOME,
    SCHEDULE_CALL,
    SCHEDULE_CALLS,
)

# Emails per booking transaction: the booking lock is held for one chunk at a time.
EMAILS_PER_CHUNK = 500


@app.task(name=FOLLOW_UP_CHECK)
def follow_up_check() -> dict[str, Any]:
    """Mark unanswered emails as waiting for a call, then schedule the calls."""
    with transaction() as session:
        marked = follow_up.request_follow_up_calls(session, utcnow(), get_settings())
    schedule_calls.delay()
    return {"marked": marked}


@app.task(name=SCHEDULE_CALLS)
def schedule_calls() -> dict[str, Any]:
    """Book a call for every email waiting for one; safe to run at any frequency."""
    settings = get_settings()
    totals = follow_up.ScheduleReport()
    known: scheduling.KnownCalls | None = None
    previous: list[int] = []
    while True:
        with transaction() as session:
            waiting = follow_up.waiting_for_call(session)
        if not waiting or waiting == previous:
            # Done, or nothing this pass could change (never loop on the same emails).
            break
        previous = waiting
        for start in range(0, len(waiting), EMAILS_PER_CHUNK):
            with transaction() as session:
                report = follow_up.schedule_follow_ups(
                    session, waiting[start : start + EMAILS_PER_CHUNK], utcnow(), settings, known
                )
            known = report.known
            totals.scheduled += report.scheduled
            totals.unschedulable += report.unschedulable
            totals.nothing_left += report.nothing_left
    if totals.unschedulable:
        send_email.delay()
    return {
        "scheduled": totals.scheduled,
        "unschedulable": totals.unschedulable,
        "nothing_left": totals.nothing_left,
    }


def apply_schedule_call(session: Session, command: received.ScheduleCall) -> None:
    requested_calls.schedule_requested_call(session, command, utcnow(), get_settings())


def apply_call_outcome(session: Session, command: received.RecordCallOutcome) -> None:
    result = outcomes.record_call_outcome(session, command, utcnow(), get_settings())
    if result.confirmations:
        send_email_after_commit(session)


schedule_call = inbound_task(SCHEDULE_CALL, apply_schedule_call)
record_call_outcome = inbound_task(RECORD_CALL_OUTCOME, apply_call_outcome)
