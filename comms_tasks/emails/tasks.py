"""``comms.send_email``: send due emails over one connection and record the results."""

from __future__ import annotations

import functools
import logging
import random
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from comms_tasks.app import app
from comms_tasks.contracts import received
from comms_tasks.db import after_commit, transaction
from comms_tasks.emails import answers, delivery, requested_emails, send_results, weekly
from comms_tasks.emails.recording import ResultRecorder
from comms_tasks.inbound.runner import inbound_task
from comms_tasks.mail.sender import sender_from_settings
from comms_tasks.models.base import utcnow
from comms_tasks.settings import get_settings
from comms_tasks.task_names import BATCH_REQUESTS, QUEUE_EMAIL, RECORD_EMAIL_RESPONSE, SEND_EMAIL

log = logging.getLogger(__name__)


# Emails claimed at a time: one SMTP connection carries them all.
EMAILS_PER_CLAIM = 100


# Leave the rest to the next run well before the soft time limit interrupts us.
TIME_BUDGET_FRACTION = 0.8


class _TimeBudgetSpentError(Exception):
    """The run's time is up: the message about to be handed over is not, nor the rest."""


@app.task(name=SEND_EMAIL)
def send_email(email_id: int | None = None, helper: bool = False) -> dict[str, Any]:
    """Send due emails (or just ``email_id``, now) until none is due or time is up.

    Returns counts by outcome: ``sent``, ``queued`` (to be retried), ``failed``, and the
    emails its claims set aside: ``cancelled`` (nothing or no one left to write to) and
    ``held`` (the therapist's second email of the day, for the next day).

    A run that finds a full claim waiting starts ``smtp_connections - 1`` helpers, so a
    backlog goes out over that many connections at once (claims never overlap).
    """
    settings = get_settings()
    rng = random.Random()  # noqa: S311 - retry jitter, not cryptography
    deadline = time.monotonic() + settings.task_soft_time_limit * TIME_BUDGET_FRACTION
    counts: dict[str, int] = {}
    helpers_started = helper or email_id is not None
    while time.monotonic() < deadline:
        set_aside: dict[str, int] = {}
        claimed_at = utcnow()
        with transaction() as session:
            messages = delivery.prepare_batch(
                session, claimed_at, EMAILS_PER_CLAIM, settings, email_id, set_aside
            )
        lease = delivery.lease_of_claim(claimed_at, settings)
        for outcome, count in set_aside.items():
            counts[outcome] = counts.get(outcome, 0) + count
        if not messages:
            if set_aside and email_id is None:
                # A claim that cancelled or held all it took: more may be due behind it.
                continue
            break
        if not helpers_started and len(messages) == EMAILS_PER_CLAIM:
            for _ in range(settings.smtp_connections - 1):
                send_email.apply_async(kwargs={"helper": True})
            helpers_started = True
        # Each result is committed while the next message goes out; no message is
        # accepted by the server before the result before it is recorded.
        results = ResultRecorder(messages, counts, rng, lease)
        before_handover = functools.partial(_recorded_and_in_time, results, deadline)
        try:
            with results:
                sender = sender_from_settings(settings)
                for result in sender.send(
                    messages, before_handover=before_handover, before_close=results.settle
                ):
                    results.add(result)
        except (SoftTimeLimitExceeded, _TimeBudgetSpentError) as stopped:
            # What was sent is recorded; what was not goes back to the queue at once.
            with transaction() as session:
                send_results.release(session, sorted(results.unrecorded), utcnow(), lease)
            if isinstance(stopped, SoftTimeLimitExceeded):
                raise
            break
        if email_id is not None:
            break
    return counts


def _recorded_and_in_time(results: ResultRecorder, deadline: float) -> None:
    """Before a message is handed over: the result before it recorded, time left."""
    results.wait()
    if time.monotonic() >= deadline:
        # Stopping here, before the server accepted it, leaves nothing unrecorded; the
        # soft time limit could strike while a reply is on its way.
        raise _TimeBudgetSpentError


def send_email_after_commit(session: Session) -> None:
    """Emails this transaction queues go out as soon as it commits, not at the next beat."""
    after_commit(session, send_email.delay)


# Therapists per transaction: bounded locks and memory, progress survives a crash.
THERAPISTS_PER_CHUNK = 500


@app.task(name=BATCH_REQUESTS)
def batch_requests(helper: bool = False) -> dict[str, Any]:
    """Queue the emails, then hand them to ``comms.send_email``.

    A run with more than one chunk starts a helper that works through the same
    therapists from the other end, so two processes render at once. They cannot do a
    therapist twice: a chunk locks its therapists (``SKIP LOCKED``: the other run leaves
    them), and a request already in an email is no longer asked about.
    """
    settings = get_settings()
    now = utcnow()
    with transaction() as session:
        candidates = weekly.batch_candidates(session)
    chunks = [
        candidates[start : start + THERAPISTS_PER_CHUNK]
        for start in range(0, len(candidates), THERAPISTS_PER_CHUNK)
    ]
    if helper:
        chunks.reverse()
    elif len(chunks) > 1:
        batch_requests.apply_async(kwargs={"helper": True})
    total = weekly.BatchReport()
    chunks_failed = 0
    for chunk in chunks:
        try:
            with transaction() as session:
                report = weekly.batch_chunk(session, chunk, now, settings)
        except Exception as exc:  # noqa: BLE001 - the other chunks still run
            # A therapist's own problem is isolated inside the chunk; this is the chunk's
            # (e.g. the database went away). Its therapists are asked by the next run.
            chunks_failed += 1
            log.error(
                "batch: the chunk of therapists %s to %s failed: %s",
                chunk[0],
                chunk[-1],
                weekly.describe_error(exc),
            )
            continue
        total.emails_queued += report.emails_queued
        total.requests_asked += report.requests_asked
        total.therapists_skipped += report.therapists_skipped
        total.failed_therapist_ids += report.failed_therapist_ids
    if total.emails_queued:
        send_email.delay()
    return {
        "candidates": len(candidates),
        "emails_queued": total.emails_queued,
        "requests_asked": total.requests_asked,
        "therapists_skipped": total.therapists_skipped,
        # Each failed therapist is logged by id; the count is enough here.
        "therapists_failed": len(total.failed_therapist_ids),
        "chunks_failed": chunks_failed,
    }


def apply_email_response(session: Session, command: received.RecordEmailResponse) -> None:
    if answers.record_response(session, command, utcnow(), get_settings()):
        send_email_after_commit(session)


def apply_queue_email(session: Session, command: received.QueueEmail) -> None:
    if requested_emails.queue_requested_email(session, command, utcnow(), get_settings()):
        send_email_after_commit(session)


record_email_response = inbound_task(RECORD_EMAIL_RESPONSE, apply_email_response)


queue_email = inbound_task(QUEUE_EMAIL, apply_queue_email)
