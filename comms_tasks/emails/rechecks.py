"""What is checked again just before an email goes: the therapist, the requests still open,
the day's limit, the redaction; an email rendered again or cancelled."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from comms_tasks.emails import answers, composing
from comms_tasks.emails.weekly import bounced_since
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
from schedules import BATCH_TIME


def redact(email: Email, now: dt.datetime) -> None:
    """The body, the answer and the answer's notes per request go; the row stays.

    An answer recorded later is kept without its text
    (:func:`comms_tasks.emails.record_response` looks at ``body_redacted_at``).
    """
    email.body_text = REDACTED_TEXT
    email.body_html = REDACTED_HTML
    email.response_content = None
    for batch in email.batches:
        batch.response_notes = None
    email.body_redacted_at = now


REDACTED_TEXT = "[Inhalt aus Datenschutzgründen entfernt]"


REDACTED_HTML = f"<p>{REDACTED_TEXT}</p>"

PATIENT_ERASED = "cancelled: its only patient was erased"


NOTHING_LEFT = "cancelled: all its requests were withdrawn before sending"


UNKNOWN_THERAPIST = "cancelled: the therapist is not known"


# A second email of the day waits for the next day's batch time: the hour therapists
# are written to anyway (schedules.BATCH_TIME, local).
HELD_UNTIL_TIME = dt.time(BATCH_TIME["hour"], BATCH_TIME["minute"])


# No therapist gets two of these on one local day; confirmations go at once.
ONE_A_DAY = composing.COUNTING_TEMPLATES


# Emails whose requests may be withdrawn before sending (a confirmation is about an
# accepted request, and stays as it is).
RECHECKED_TEMPLATES = (*composing.ASKING_TEMPLATES, EmailTemplate.FOLLOW_UP)


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
