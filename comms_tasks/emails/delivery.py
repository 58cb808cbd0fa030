"""Sending queued emails: claim, re-check, send, and record each result.

A worker claims due emails by moving them to ``sending`` with a lease (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL, so two workers never claim the same email) and commits; it then
sends them over one connection and records each result as it comes, before the next
message is handed over (``emails/recording.py``). An email whose lease ran out (its
worker died) is due again. Temporary failures wait in the database (``next_attempt_at``),
never in a Celery countdown.

At its claim, each email is checked again (:func:`prepare_batch`): its therapist, its
requests and patients, and whether the therapist already gets an email that local day.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Mapping
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, select, text, update
from sqlalchemy.orm import Session, defer, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from comms_tasks.contracts.published import EmailFailedPayload
from comms_tasks.emails import answers, composing, rechecks
from comms_tasks.emails.rechecks import (
    addressed_as_now,
    hold_until_tomorrow,
    requests_to_keep,
    rerender,
    therapists_emailed_today,
    why_not_to,
)
from comms_tasks.events.outbox import record_event
from comms_tasks.mail.message import OutgoingMessage
from comms_tasks.models import Email, EmailStatus, Therapist
from comms_tasks.models.base import utcnow
from comms_tasks.settings import Settings, get_settings

EMAILS = cast(Table, Email.__table__)


def prepare_batch(
    session: Session,
    now: dt.datetime,
    limit: int,
    settings: Settings,
    email_id: int | None = None,
    set_aside: dict[str, int] | None = None,
) -> list[OutgoingMessage]:
    """Claim due emails and turn the ones still worth sending into messages.

    ``set_aside`` counts the claimed emails that do not go now (``cancelled``, ``held``,
    and ``failed``: lost to dead workers once too often).

    Each claimed email is checked again, in this order, whatever its template: its
    therapist (still active, not deleted, with an address; else it is cancelled), for a
    reminder its original's answer (one known by the time it was queued cancels it), its
    requests (withdrawn ones are dropped; it is cancelled when none is left), and the
    day: an email that would be the therapist's second of the local day (sent, or being
    sent by another claim, or earlier in this one) waits for the next day, confirmations
    aside. What goes is rendered again, to the therapist's current address, name and
    greeting, if any of these or its requests changed. The checks read the whole claim
    at once: the same handful of queries for one email or a hundred.
    """
    lock_claims(session)
    tally = set_aside if set_aside is not None else {}
    emails = claim_due(session, now, limit, settings, email_id, tally)
    if not emails:
        return []
    therapists = {
        therapist.id: therapist
        for therapist in session.scalars(
            select(Therapist).where(Therapist.id.in_({email.therapist_id for email in emails}))
        )
    }
    keep, erased_requests = requests_to_keep(session, emails)
    emailed_today = therapists_emailed_today(session, emails, now, settings)
    # The emails replied to (for threading headers), in one query.
    original_ids = {email.in_reply_to_email_id for email in emails} - {None}
    originals = {
        original.id: original
        for original in (
            session.scalars(
                select(Email)
                .where(Email.id.in_(original_ids))
                .options(defer(Email.body_html), defer(Email.body_text))
            )
            if original_ids
            else ()
        )
    }
    voided = answers.voided_reminders(session, emails, originals)
    going: list[Email] = []
    to_render: list[Email] = []
    for email in emails:
        therapist = therapists.get(email.therapist_id)
        reason = rechecks.UNKNOWN_THERAPIST if therapist is None else why_not_to(therapist)
        if therapist is None or reason is not None:
            answers.cancel_unsent(email, reason or rechecks.UNKNOWN_THERAPIST)
            tally["cancelled"] = tally.get("cancelled", 0) + 1
            continue
        if email.id in voided:
            # Claimed by another run when its original's answer came, and given back unsent.
            answers.cancel_unsent(email, answers.REMINDER_VOIDED)
            tally["cancelled"] = tally.get("cancelled", 0) + 1
            continue
        included = [batch for batch in email.batches if batch.included]
        dropped = [batch for batch in included if batch.placement_request_id not in keep]
        if included and len(dropped) == len(included):
            erased = [b for b in dropped if b.placement_request_id in erased_requests]
            answers.cancel_unsent(
                email,
                rechecks.PATIENT_ERASED if len(erased) == len(dropped) else rechecks.NOTHING_LEFT,
            )
            if erased and email.body_redacted_at is None:
                # Queued while the erasure ran, with a summary read before it.

                rechecks.redact(email, now)
            for batch in dropped:
                batch.included = False
            tally["cancelled"] = tally.get("cancelled", 0) + 1
            continue
        if email.template in rechecks.ONE_A_DAY:
            if email.therapist_id in emailed_today:
                hold_until_tomorrow(email, now, settings)
                tally["held"] = tally.get("held", 0) + 1
                continue
            emailed_today.add(email.therapist_id)
        for batch in dropped:
            batch.included = False
        # A body redacted while a worker had it claimed is rendered again from the read
        # model before it goes out; it never goes out as the placeholder.
        redacted = email.body_redacted_at is not None
        if dropped or redacted or not addressed_as_now(email, therapist):
            to_render.append(email)
        going.append(email)
    if to_render:
        patients = composing.patients_of(
            session,
            [
                batch.placement_request_id
                for email in to_render
                for batch in email.batches
                if batch.included
            ],
        )
        for email in to_render:
            rerender(session, email, therapists[email.therapist_id], settings, patients)
    return [outgoing(session, email, originals=originals) for email in going]


# Temporary failures: wait 1 min, doubling, at most 1 h; the 8th failed attempt is final.
FIRST_RETRY_DELAY = dt.timedelta(minutes=1)
MAX_RETRY_DELAY = dt.timedelta(hours=1)
MAX_ATTEMPTS = 8
# +-20 %: emails that failed together do not all come back in the same second.
RETRY_JITTER = 0.2
# A claim outlives the task's hard time limit, so a live worker never loses its claim.
LEASE_MARGIN = dt.timedelta(minutes=1)
MAX_ERROR_LENGTH = 1000
# Claims take this PostgreSQL advisory lock one after another (see lock_claims).
CLAIM_LOCK_KEY = 0x636F6D6D7353  # "commsS"
# A claim whose lease ran out without a recorded result: its worker stopped (perhaps
# mid-send, perhaps before this email's turn; nobody knows, so it counts).
WORKER_LOST = (
    "the worker stopped before recording a result (its lease ran out); counted as an attempt"
)


def retry_delay(failed_attempts: int, rng: random.Random) -> dt.timedelta:
    """The wait before the next attempt after ``failed_attempts`` failures (>= 1)."""
    base = min(FIRST_RETRY_DELAY * 2 ** (failed_attempts - 1), MAX_RETRY_DELAY)
    jittered = base * rng.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)
    return min(jittered, MAX_RETRY_DELAY)


def lease_duration(settings: Settings) -> dt.timedelta:
    return dt.timedelta(seconds=settings.task_time_limit) + LEASE_MARGIN


def lease_of_claim(claimed_at: dt.datetime, settings: Settings) -> dt.datetime:
    """The lease a claim made at ``claimed_at`` writes on its emails: also what tells the
    claim from a later one of the same email (after this lease ran out)."""
    return claimed_at + lease_duration(settings)


def _queued_due(now: dt.datetime) -> tuple[ColumnElement[bool], ...]:
    """Due queued emails as two ranges of ``ix_emails_queued_next_attempt_at``, in claim
    order (NULLs last, as PostgreSQL orders them): each an index condition, so that a claim
    with little due reads no queued email that is not due yet (one condition with an OR
    left every such email to be fetched and thrown away)."""
    queued = Email.status == EmailStatus.QUEUED
    return queued & (Email.next_attempt_at <= now), queued & Email.next_attempt_at.is_(None)


def _lease_expired(now: dt.datetime) -> ColumnElement[bool]:
    return (Email.status == EmailStatus.SENDING) & (Email.lease_expires_at < now)


def claim_due(
    session: Session,
    now: dt.datetime,
    limit: int,
    settings: Settings,
    email_id: int | None,
    set_aside: dict[str, int],
) -> list[Email]:
    """Move up to ``limit`` due emails to ``sending`` under a lease; returns them.

    An email whose lease ran out is counted as a failed attempt first
    (:func:`count_lost_attempt`); one that has had all its attempts is ``failed`` instead
    of claimed (``set_aside["failed"]``).
    """
    query = (
        select(Email)
        .options(selectinload(Email.batches))
        .order_by(Email.next_attempt_at, Email.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    if email_id is not None:
        # An immediate send of one email does not wait for its retry time.
        found = list(
            session.scalars(
                query.where(Email.id == email_id).where(
                    (Email.status == EmailStatus.QUEUED) | _lease_expired(now)
                )
            )
        )
    else:
        # Emails whose worker died (claimed before, rare) are taken first, then queued
        # ones in their order, read from ix_emails_queued_next_attempt_at: one query for
        # both read and sorted every due email for the first ``limit`` of them. The claim
        # then goes in claim order, due time then id, as one query gave it.
        found = list(session.scalars(query.where(_lease_expired(now))))
        expired = len(found)
        for due in _queued_due(now):
            if len(found) < limit:
                found += session.scalars(query.where(due).limit(limit - len(found)))
        if expired:
            found.sort(key=_claim_order)
    lease = lease_of_claim(now, settings)
    claimed, starting = [], []
    for email in found:
        if email.status is EmailStatus.SENDING:
            if count_lost_attempt(session, email, now):
                set_aside["failed"] = set_aside.get("failed", 0) + 1
                continue
            email.lease_expires_at = lease
        else:
            starting.append(email)
        claimed.append(email)
    if starting:
        start_sending(session, starting, lease)
    return claimed


def _claim_order(email: Email) -> tuple[bool, dt.datetime, int]:
    due = email.next_attempt_at
    return due is None, due or dt.datetime.min.replace(tzinfo=dt.UTC), email.id


def start_sending(session: Session, emails: list[Email], lease: dt.datetime) -> None:
    """Queued emails to ``sending`` under ``lease``: one ``UPDATE`` for them all, where the
    flush would write one per email; the loaded objects say what it wrote."""
    activity = utcnow()  # a status change: the retention clock moves, as track_activity's
    session.execute(
        update(EMAILS)
        .where(EMAILS.c.id.in_([email.id for email in emails]))
        .values(status=EmailStatus.SENDING, lease_expires_at=lease, last_activity_at=activity)
    )
    for email in emails:
        set_committed_value(email, "status", EmailStatus.SENDING)
        set_committed_value(email, "lease_expires_at", lease)
        set_committed_value(email, "last_activity_at", activity)


def count_lost_attempt(session: Session, email: Email, now: dt.datetime) -> bool:
    """An email still ``sending`` after its lease: its worker died during the attempt (the
    recorder would have moved it on). That attempt counts like a failed one, once: here,
    since no result of it was recorded. The last one allowed fails the email (True)."""
    email.retry_count += 1
    email.error_message = WORKER_LOST
    if email.retry_count < MAX_ATTEMPTS:
        return False
    fail(session, email, now)
    return True


def fail(session: Session, email: Email, now: dt.datetime) -> None:
    """The email failed for good, for the reason in its ``error_message``."""
    for name, value in failed_values().items():
        setattr(email, name, value)
    record_event(session, failed_event(email.id, email.therapist_id, email.error_message), now)


# What a result changes, as column values: the ORM (fail) and the statements of
# record_results apply the same ones.


def failed_values() -> dict[str, Any]:
    return {"status": EmailStatus.FAILED, "lease_expires_at": None, "next_attempt_at": None}


def failed_event(email_id: int, therapist_id: int, reason: str | None) -> EmailFailedPayload:
    return EmailFailedPayload(email_id=email_id, therapist_id=therapist_id, reason=reason)


def sent_values(now: dt.datetime) -> dict[str, Any]:
    return {
        "status": EmailStatus.SENT,
        "sent_at": now,
        "lease_expires_at": None,
        "next_attempt_at": None,
        "error_message": None,
    }


def retry_values(retry_count: int, now: dt.datetime, rng: random.Random) -> dict[str, Any]:
    return {"status": EmailStatus.QUEUED, "next_attempt_at": now + retry_delay(retry_count, rng)}


def outgoing(
    session: Session,
    email: Email,
    settings: Settings | None = None,
    originals: Mapping[int, Email] | None = None,
) -> OutgoingMessage:
    """``email`` as it goes out; ``originals``: the emails replied to, loaded already."""
    references: tuple[str, ...] = ()
    in_reply_to = None
    if email.in_reply_to_email_id is not None:
        original = (
            originals.get(email.in_reply_to_email_id)
            if originals is not None
            else session.get(Email, email.in_reply_to_email_id)
        )
        if original is not None:
            in_reply_to = original.message_id
            references = (original.message_id,)
    return OutgoingMessage(
        email_id=email.id,
        therapist_id=email.therapist_id,
        message_id=email.message_id,
        sender_email=email.sender_email,
        sender_name=email.sender_name,
        recipient_email=email.recipient_email,
        recipient_name=email.recipient_name,
        reply_to=email.reply_to,
        subject=email.subject,
        body_text=email.body_text,
        body_html=email.body_html,
        date=email.queued_at or email.created_at,
        in_reply_to=in_reply_to,
        references=references,
        envelope_sender=composing.bounce_address(settings or get_settings(), email.reply_token),
    )


def lock_claims(session: Session) -> None:
    """Claims one at a time until this transaction ends (PostgreSQL; SQLite's writers queue
    anyway), so that each claim sees what the one before it took for the same therapist."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK_KEY})


def retry_now(session: Session, email: Email, now: dt.datetime) -> None:
    """An operator's retry: a failed or waiting email is queued for the next send.

    A redacted body (erasure, retention) is rendered again from the read model first, as
    the email would be written now; a :class:`ValueError` says why when it cannot be.
    """
    if email.status not in (EmailStatus.FAILED, EmailStatus.QUEUED):
        raise ValueError(f"email {email.id} is {email.status.value}; only failed or queued retry")
    if email.body_redacted_at is not None:
        rechecks.render_redacted_again(session, email, get_settings())
    email.status = EmailStatus.QUEUED
    email.next_attempt_at = now
    email.retry_count = 0


def cancel(session: Session, email: Email) -> None:
    if email.status not in (EmailStatus.DRAFT, EmailStatus.QUEUED, EmailStatus.FAILED):
        raise ValueError(f"email {email.id} is {email.status.value}; it can no longer be cancelled")
    answers.cancel_unsent(email, "cancelled by an operator")
