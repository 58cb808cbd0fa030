"""TODO."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, defer

from comms_tasks.emails import answers, composing
from comms_tasks.emails.delivery import (
    HELD_UNTIL_TIME,
    NOTHING_LEFT,
    ONE_A_DAY,
    PATIENT_ERASED,
    RECHECKED_TEMPLATES,
    UNKNOWN_THERAPIST,
    claim_due,
    lock_claims,
    outgoing,
)
from comms_tasks.emails.weekly import bounced_since
from comms_tasks.mail.message import OutgoingMessage
from comms_tasks.mail.render import greeting
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
from comms_tasks.rules.batching import local_day, local_midnight
from comms_tasks.settings import Settings


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
        and email.body_text.startswith(f"{greeting(composing.recipient_of(therapist))},")
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
    if template in composing.ASKING_TEMPLATES:
        several = len(remaining) > 1
        template = EmailTemplate.BATCH_REQUEST if several else EmailTemplate.INITIAL_CONTACT
    original = (
        session.get(Email, email.in_reply_to_email_id) if email.in_reply_to_email_id else None
    )
    rendered = composing.render_email(
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
        answers.cancel_unsent(email, cancel_reason)
        return False
    therapist = session.get(Therapist, email.therapist_id)
    if therapist is None:
        # Its claim would cancel it anyway; its body is not rendered for no one.
        answers.cancel_unsent(email, UNKNOWN_THERAPIST)
        return False
    rerender(session, email, therapist, settings)
    return True


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
            answers.cancel_unsent(email, reason or UNKNOWN_THERAPIST)
            tally["cancelled"] = tally.get("cancelled", 0) + 1
            continue
        included = [batch for batch in email.batches if batch.included]
        dropped = [batch for batch in included if batch.placement_request_id not in keep]
        if included and len(dropped) == len(included):
            erased = [b for b in dropped if b.placement_request_id in erased_requests]
            answers.cancel_unsent(
                email, PATIENT_ERASED if len(erased) == len(dropped) else NOTHING_LEFT
            )
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
    return [outgoing(session, email) for email in going]


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
