"""Sending queued emails: claim, re-check, send, and record each result.

A worker claims due emails by moving them to ``sending`` with a lease (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL, so two workers never claim the same email) and commits; it then
sends them over one connection and records the results in small groups as they come
(:func:`record_results`; the task decides the groups). An email whose lease ran out (its
worker died) is due again. Temporary failures wait in the database (``next_attempt_at``),
never in a Celery countdown.

At its claim, each email is checked again (:func:`prepare_batch`): its therapist, its
requests and patients, and whether the therapist already gets an email that local day.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Sequence

from sqlalchemy import or_, select, text, update
from sqlalchemy.orm import Session, defer, selectinload

from comms_tasks.rules.batching import local_day, local_midnight
from comms_tasks.contracts.published import EmailFailedPayload, EmailSentPayload
from comms_tasks.emails.email_rules import bounced_since
from comms_tasks.mail.message import OutgoingMessage
from comms_tasks.mail.render import greeting
from comms_tasks.mail.sender import SendResult
from comms_tasks.models import (
    Email,
    EmailStatus,
    EmailTemplate,
    Patient,
    PlacementRequest,
    Therapist,
    TherapistStatus,
)
from comms_tasks.models.enums import PENDING_REQUEST_STATUSES
from comms_tasks.events.outbox import record_event
from comms_tasks.settings import Settings, get_settings
from schedules import BATCH_TIME
import comms_tasks.emails.composing
import comms_tasks.emails.answers

# Temporary failures: wait 1 min, doubling, at most 1 h; the 8th failed attempt is final.
FIRST_RETRY_DELAY = dt.timedelta(minutes=1)
MAX_RETRY_DELAY = dt.timedelta(hours=1)
MAX_ATTEMPTS = 8
# +-20 %: emails that failed together do not all come back in the same second.
RETRY_JITTER = 0.2
# A claim outlives the task's hard time limit, so a live worker never loses its claim.
LEASE_MARGIN = dt.timedelta(minutes=1)
MAX_ERROR_LENGTH = 1000
# Emails whose requests may be withdrawn before sending (a confirmation is about an
# accepted request, and stays as it is).
RECHECKED_TEMPLATES = (*comms_tasks.emails.composing.ASKING_TEMPLATES, EmailTemplate.FOLLOW_UP)
# No therapist gets two of these on one local day (SPEC §5); confirmations go at once.
ONE_A_DAY = comms_tasks.emails.composing.COUNTING_TEMPLATES
# A second email of the day waits for the next day's batch time: the hour therapists
# are written to anyway (schedules.BATCH_TIME, local).
HELD_UNTIL_TIME = dt.time(BATCH_TIME["hour"], BATCH_TIME["minute"])
# Claims take this PostgreSQL advisory lock one after another (see lock_claims).
CLAIM_LOCK_KEY = 0x636F6D6D7353  # "commsS"
UNKNOWN_THERAPIST = "cancelled: the therapist is not known"
NOTHING_LEFT = "cancelled: all its requests were withdrawn before sending"
PATIENT_ERASED = "cancelled: its only patient was erased"
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


def _due(now: dt.datetime) -> object:
    return or_(
        (Email.status == EmailStatus.QUEUED)
        & or_(Email.next_attempt_at.is_(None), Email.next_attempt_at <= now),
        (Email.status == EmailStatus.SENDING) & (Email.lease_expires_at < now),
    )


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
    if email_id is None:
        query = query.where(_due(now))  # type: ignore[arg-type]
    else:
        # An immediate send of one email does not wait for its retry time.
        query = query.where(Email.id == email_id).where(
            (Email.status == EmailStatus.QUEUED)
            | ((Email.status == EmailStatus.SENDING) & (Email.lease_expires_at < now))
        )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    claimed = []
    for email in session.scalars(query):
        if email.status is EmailStatus.SENDING and count_lost_attempt(session, email, now):
            set_aside["failed"] = set_aside.get("failed", 0) + 1
            continue
        email.status = EmailStatus.SENDING
        email.lease_expires_at = now + lease_duration(settings)
        claimed.append(email)
    return claimed


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
    email.status = EmailStatus.FAILED
    email.lease_expires_at = None
    email.next_attempt_at = None
    record_event(
        session,
        EmailFailedPayload(
            email_id=email.id, therapist_id=email.therapist_id, reason=email.error_message
        ),
        occurred_at=now,
    )


def why_not_to(therapist: Therapist) -> str | None:
    """Why an email may not go to this therapist any more (None: it may), without details."""
    if therapist.deleted_at is not None:
        return "cancelled: the therapist was deleted"
    if therapist.status is not TherapistStatus.ACTIVE:
        return f"cancelled: the therapist is {therapist.status.value}"
    if not therapist.email:
        return "cancelled: the therapist has no email address"
    if bounced_since(therapist) is not None:
        return "cancelled: the therapist's address bounced for good"
    return None


def addressed_as_now(email: Email, therapist: Therapist) -> bool:
    """Whether the email goes to the therapist's current address, name and greeting.

    The greeting is the first line of every text body (``_base/body.txt``); a changed
    salutation changes it without changing the address or the name.
    """
    return (
        email.recipient_email == therapist.email
        and email.recipient_name == therapist.display_name
        and email.body_text.startswith(f"{greeting(comms_tasks.emails.composing.recipient_of(therapist))},")
    )


def rerender(
    session: Session,
    email: Email,
    therapist: Therapist,
    settings: Settings,
    patients: dict[int, Patient | None] | None = None,
) -> None:
    """Address an unsent email to the therapist as they are now, and render it again for
    its included requests; ``patients`` when already read for many emails."""
    remaining = [batch.placement_request_id for batch in email.batches if batch.included]
    if therapist.email:
        email.recipient_email = therapist.email
    email.recipient_name = therapist.display_name
    if not remaining:
        # Not about any request (written by hand): addressed again, its body kept.
        return
    template = email.template
    if template in comms_tasks.emails.composing.ASKING_TEMPLATES:
        several = len(remaining) > 1
        template = EmailTemplate.BATCH_REQUEST if several else EmailTemplate.INITIAL_CONTACT
    original = (
        session.get(Email, email.in_reply_to_email_id) if email.in_reply_to_email_id else None
    )
    rendered = comms_tasks.emails.composing.render_email(
        session, therapist, template, remaining, settings, earlier=original, patients=patients
    )
    email.template = template
    email.subject = rendered.subject
    email.body_text = rendered.body_text
    email.body_html = rendered.body_html
    # A fresh body from the read model: an earlier redaction no longer describes it.
    email.body_redacted_at = None


def rerender_or_cancel(
    session: Session, email: Email, settings: Settings, cancel_reason: str
) -> bool:
    """Render an unsent email again for its still-included requests, or cancel it."""
    if not any(batch.included for batch in email.batches):
        comms_tasks.emails.answers.cancel_unsent(email, cancel_reason)
        return False
    therapist = session.get(Therapist, email.therapist_id)
    if therapist is None:
        # Its claim would cancel it anyway; its body is not rendered for no one.
        comms_tasks.emails.answers.cancel_unsent(email, UNKNOWN_THERAPIST)
        return False
    rerender(session, email, therapist, settings)
    return True


def outgoing(session: Session, email: Email, settings: Settings | None = None) -> OutgoingMessage:
    references: tuple[str, ...] = ()
    in_reply_to = None
    if email.in_reply_to_email_id is not None:
        original = session.get(Email, email.in_reply_to_email_id)
        if original is not None:
            in_reply_to = original.message_id
            references = (original.message_id,)
    return OutgoingMessage(
        email_id=email.id,
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
        envelope_sender=comms_tasks.emails.composing.bounce_address(settings or get_settings(), email.reply_token),
    )


def lock_claims(session: Session) -> None:
    """Claims one at a time until this transaction ends (PostgreSQL; SQLite's writers queue
    anyway), so that each claim sees what the one before it took for the same therapist."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK_KEY})


def requests_to_keep(session: Session, emails: Sequence[Email]) -> tuple[set[int], set[int]]:
    """The included requests of ``emails`` that may still be shown, and those of erased
    patients, in one query.

    A request whose patient was erased is never shown again, in any email (one claimed
    at the erasure and sent back to the queue still includes it); one no longer open or
    in progress is dropped from the emails that ask about it
    (:data:`RECHECKED_TEMPLATES`), not from a confirmation, which is about an accepted
    request.
    """
    request_ids = {
        batch.placement_request_id for email in emails for batch in email.batches if batch.included
    }
    if not request_ids:
        return set(), set()
    rows = session.execute(
        select(PlacementRequest.id, PlacementRequest.status, Patient.erased_at)
        .outerjoin(Patient, Patient.id == PlacementRequest.patient_id)
        .where(PlacementRequest.id.in_(request_ids))
    ).all()
    known = {row.id: row for row in rows}
    erased = {row.id for row in rows if row.erased_at is not None}
    keep = set()
    for email in emails:
        for batch in email.batches:
            row = known.get(batch.placement_request_id)
            if not batch.included or batch.placement_request_id in erased:
                continue
            if email.template not in RECHECKED_TEMPLATES or (
                row is not None and row.status in PENDING_REQUEST_STATUSES
            ):
                keep.add(batch.placement_request_id)
    return keep, erased


def therapists_emailed_today(
    session: Session, emails: Sequence[Email], now: dt.datetime, settings: Settings
) -> set[int]:
    """Therapists of ``emails`` who got an email today (local) or are getting one from
    another claim; confirmations aside. One query."""
    therapist_ids = {email.therapist_id for email in emails if email.template in ONE_A_DAY}
    if not therapist_ids:
        return set()
    day_start = local_midnight(local_day(now, settings.zone), settings.zone)
    claimed = [email.id for email in emails]
    return set(
        session.scalars(
            select(Email.therapist_id)
            .where(Email.therapist_id.in_(therapist_ids))
            .where(Email.template.in_(ONE_A_DAY))
            .where(Email.id.not_in(claimed))
            .where(
                ((Email.status == EmailStatus.SENT) & (Email.sent_at >= day_start))
                | ((Email.status == EmailStatus.SENDING) & (Email.lease_expires_at >= now))
            )
            .distinct()
        )
    )


def next_day_at_batch_time(now: dt.datetime, settings: Settings) -> dt.datetime:
    tomorrow = local_day(now, settings.zone) + dt.timedelta(days=1)
    return dt.datetime.combine(tomorrow, HELD_UNTIL_TIME, tzinfo=settings.zone).astimezone(dt.UTC)


def hold_until_tomorrow(email: Email, now: dt.datetime, settings: Settings) -> None:
    """Back to the queue for the next day, not as a failed attempt (``retry_count`` stays)."""
    email.status = EmailStatus.QUEUED
    email.lease_expires_at = None
    email.next_attempt_at = next_day_at_batch_time(now, settings)
    local = email.next_attempt_at.astimezone(settings.zone)
    email.error_message = (
        f"held until {local:%Y-%m-%d %H:%M}: the therapist already gets an email today"
    )


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
    therapist (still active, not deleted, with an address; else it is cancelled), its
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
    # The emails replied to (for threading headers), in one query: session.get finds them.
    originals = {email.in_reply_to_email_id for email in emails} - {None}
    if originals:
        session.scalars(
            select(Email)
            .where(Email.id.in_(originals))
            .options(defer(Email.body_html), defer(Email.body_text))
        ).all()
    going: list[Email] = []
    to_render: list[Email] = []
    for email in emails:
        therapist = therapists.get(email.therapist_id)
        reason = UNKNOWN_THERAPIST if therapist is None else why_not_to(therapist)
        if therapist is None or reason is not None:
            comms_tasks.emails.answers.cancel_unsent(email, reason or UNKNOWN_THERAPIST)
            tally["cancelled"] = tally.get("cancelled", 0) + 1
            continue
        included = [batch for batch in email.batches if batch.included]
        dropped = [batch for batch in included if batch.placement_request_id not in keep]
        if included and len(dropped) == len(included):
            erased = [b for b in dropped if b.placement_request_id in erased_requests]
            comms_tasks.emails.answers.cancel_unsent(email, PATIENT_ERASED if len(erased) == len(dropped) else NOTHING_LEFT)
            if erased and email.body_redacted_at is None:
                # Queued while the erasure ran, with a summary read before it.
                from comms_tasks.privacy.retention import redact  # retention builds on this module

                redact(email, now)
            for batch in dropped:
                batch.included = False
            tally["cancelled"] = tally.get("cancelled", 0) + 1
            continue
        if email.template in ONE_A_DAY:
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
        patients = comms_tasks.emails.composing.patients_of(
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
    return [outgoing(session, email) for email in going]


@dataclasses.dataclass(frozen=True)
class Recorded:
    email_id: int
    status: EmailStatus


def record_results(
    session: Session, results: Sequence[tuple[SendResult, dt.datetime]], rng: random.Random
) -> list[Recorded]:
    """Store several sends' results (each with when it came) at once.

    Emails no longer ours are skipped: our lease ran out and another send claimed them,
    or an operator cancelled them.
    """
    if not results:
        return []
    emails = {
        email.id: email
        for email in session.scalars(
            select(Email)
            .where(Email.id.in_([result.email_id for result, _ in results]))
            .options(defer(Email.body_html), defer(Email.body_text))
            .order_by(Email.id)
            .with_for_update()
        )
    }
    recorded = []
    for result, at in results:
        email = emails.get(result.email_id)
        if email is not None and email.status is EmailStatus.SENDING:
            recorded.append(_record(session, email, result, at, rng))
    return recorded


def _record(
    session: Session, email: Email, result: SendResult, now: dt.datetime, rng: random.Random
) -> Recorded:
    email.lease_expires_at = None
    if result.delivered:
        email.status = EmailStatus.SENT
        email.sent_at = now
        email.next_attempt_at = None
        email.error_message = None
        record_event(
            session,
            EmailSentPayload(
                email_id=email.id,
                therapist_id=email.therapist_id,
                message_id=email.message_id,
                sent_at=now,
            ),
            occurred_at=now,
        )
        return Recorded(email.id, email.status)
    email.error_message = (result.error or "unknown error")[:MAX_ERROR_LENGTH]
    email.retry_count += 1
    if result.temporary and email.retry_count < MAX_ATTEMPTS:
        email.status = EmailStatus.QUEUED
        email.next_attempt_at = now + retry_delay(email.retry_count, rng)
        return Recorded(email.id, email.status)
    fail(session, email, now)
    return Recorded(email.id, email.status)


def release(session: Session, email_ids: Sequence[int], now: dt.datetime) -> None:
    """Give claimed emails back at once (the task stops before sending them)."""
    session.execute(
        update(Email)
        .where(Email.id.in_(email_ids))
        .where(Email.status == EmailStatus.SENDING)
        .values(status=EmailStatus.QUEUED, lease_expires_at=None, next_attempt_at=now)
    )


def retry_now(session: Session, email: Email, now: dt.datetime) -> None:
    """An operator's retry: a failed or waiting email is queued for the next send.

    A redacted body (erasure, retention) is rendered again from the read model first, as
    the email would be written now; a :class:`ValueError` says why when it cannot be.
    """
    if email.status not in (EmailStatus.FAILED, EmailStatus.QUEUED):
        raise ValueError(f"email {email.id} is {email.status.value}; only failed or queued retry")
    if email.body_redacted_at is not None:
        render_redacted_again(session, email, get_settings())
    email.status = EmailStatus.QUEUED
    email.next_attempt_at = now
    email.retry_count = 0


def render_redacted_again(session: Session, email: Email, settings: Settings) -> None:
    """Write a redacted, unsent email again from the read model, by the claim's rules: its
    therapist may still be written to, and only requests that may still be shown stay."""
    refused = f"email {email.id} cannot be retried: its body was redacted and"
    therapist = session.get(Therapist, email.therapist_id)
    reason = UNKNOWN_THERAPIST if therapist is None else why_not_to(therapist)
    if therapist is None or reason is not None:
        raise ValueError(f"{refused} {(reason or '').removeprefix('cancelled: ')}")
    included = [batch for batch in email.batches if batch.included]
    if not included:
        raise ValueError(f"{refused} it is about no request: there is nothing to write again")
    keep, _ = requests_to_keep(session, [email])
    if not any(batch.placement_request_id in keep for batch in included):
        raise ValueError(
            f"{refused} none of its requests may be shown again"
            " (withdrawn, or the patient was erased)"
        )
    for batch in included:
        if batch.placement_request_id not in keep:
            batch.included = False
    rerender(session, email, therapist, settings)


def cancel(session: Session, email: Email) -> None:
    if email.status not in (EmailStatus.DRAFT, EmailStatus.QUEUED, EmailStatus.FAILED):
        raise ValueError(f"email {email.id} is {email.status.value}; it can no longer be cancelled")
    comms_tasks.emails.answers.cancel_unsent(email, "cancelled by an operator")
