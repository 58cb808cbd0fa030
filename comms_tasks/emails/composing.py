"""Composing emails: the recipient, the reply and bounce addresses, the patients shown,
the rendering, and the rows (with their batches and ``email.queued``) of new emails."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from comms_tasks.contracts.published import EmailQueuedPayload
from comms_tasks.db import insert_rows
from comms_tasks.events.outbox import record_events
from comms_tasks.mail import tokens as reply_tokens
from comms_tasks.mail.message import new_message_id
from comms_tasks.mail.render import (
    EarlierEmail,
    EmailRenderer,
    PatientEntry,
    Recipient,
    RenderedEmail,
)
from comms_tasks.models import (
    Email,
    EmailBatch,
    EmailStatus,
    EmailTemplate,
    Patient,
    PlacementRequest,
    Therapist,
)
from comms_tasks.models.read_models import SUMMARY_FIELDS
from comms_tasks.settings import Settings

# Emails that ask about requests; a request is "in an email" while one of these is live.
ASKING_TEMPLATES = (EmailTemplate.INITIAL_CONTACT, EmailTemplate.BATCH_REQUEST)


# Emails that count towards the weekly limit (confirmations do not).
COUNTING_TEMPLATES = (*ASKING_TEMPLATES, EmailTemplate.FOLLOW_UP)


UNSENT_STATUSES = (EmailStatus.DRAFT, EmailStatus.QUEUED, EmailStatus.SENDING)


DEAD_STATUSES = (EmailStatus.FAILED, EmailStatus.CANCELLED)


# How a failed email's error begins when the server refused its recipient with a 5xx
# (mail/sender.py: classify; a 4xx refusal is temporary and never ends the email alone).
REFUSED_FOR_GOOD = "recipient refused: 5"


@functools.cache
def renderer_for(sender_name: str) -> EmailRenderer:
    """One renderer per process: templates are compiled once."""
    return EmailRenderer(sender_name=sender_name)


def recipient_of(therapist: Therapist) -> Recipient:
    return Recipient(
        salutation=therapist.salutation,
        title=therapist.title,
        first_name=therapist.first_name,
        last_name=therapist.last_name,
    )


def reply_address(settings: Settings, token: str) -> str | None:
    """Where the therapist's reply goes: the email's own tagged address, when configured."""
    if settings.reply_address is not None:
        return reply_tokens.tagged_address(settings.reply_address, token)
    return settings.reply_to


def bounce_address(settings: Settings, token: str | None) -> str | None:
    """The envelope sender bounces go to (VERP), when configured; else the sender's."""
    if settings.bounce_address is not None and token is not None:
        return reply_tokens.tagged_address(settings.bounce_address, token)
    return None


def patients_of(
    session: Session, request_ids: Iterable[int], *, lock: bool = False
) -> dict[int, Patient | None]:
    """The patient of each request (None when its summary has not arrived), in one query.

    ``lock``: the patients are share-locked until the transaction ends (PostgreSQL), for
    an email about to be queued with their summaries. ``patient.erased`` takes the patient
    row ``FOR UPDATE`` before it looks for the emails that show it, so the two take
    turns: an erasure under way is waited for and its result read (no summary), or the
    erasure waits for this transaction and then finds, and rewrites, its new email.
    """
    ids = sorted(set(request_ids))
    if not ids:
        return {}  # an answer without outcomes (a reply read from the mailbox) asks none
    if not lock or session.get_bind().dialect.name != "postgresql":
        rows = session.execute(
            select(PlacementRequest.id, Patient)
            .outerjoin(Patient, Patient.id == PlacementRequest.patient_id)
            .where(PlacementRequest.id.in_(ids))
        ).all()
        return {request_id: patient for request_id, patient in rows}
    # The nullable side of an outer join cannot be locked: an inner join, and a request
    # without a patient row maps to None. Locked in id order, rows read as they are now
    # (populate_existing: not as an earlier statement of this session loaded them).
    locked = session.execute(
        select(PlacementRequest.id, Patient)
        .join(Patient, Patient.id == PlacementRequest.patient_id)
        .where(PlacementRequest.id.in_(ids))
        .order_by(Patient.id)
        .with_for_update(read=True, of=Patient)
        .execution_options(populate_existing=True)
    ).all()
    found: dict[int, Patient | None] = dict.fromkeys(ids)
    found.update({request_id: patient for request_id, patient in locked})
    return found


def is_erased(patient: Patient | None) -> bool:
    return patient is not None and patient.erased_at is not None


def patient_entry(
    request_id: int, position: int, summary: Mapping[str, Any] | None
) -> PatientEntry:
    """One patient as the templates show them; a field the summary lacks stays empty."""
    fields = {field: (summary or {}).get(field) for field in SUMMARY_FIELDS}
    return PatientEntry(placement_request_id=request_id, position=position, **fields)


def entries_for(
    request_ids: Sequence[int], patients: dict[int, Patient | None]
) -> list[PatientEntry]:
    """The patients of ``request_ids``, in that order, as the templates show them."""
    entries = []
    for position, request_id in enumerate(request_ids, start=1):
        patient = patients.get(request_id)
        summary = {field: getattr(patient, field) for field in SUMMARY_FIELDS} if patient else None
        entries.append(patient_entry(request_id, position, summary))
    return entries


def earlier_of(email: Email | None, settings: Settings) -> EarlierEmail | None:
    if email is None:
        return None
    sent = email.sent_at or email.queued_at or email.created_at
    return EarlierEmail(subject=email.subject, sent_on=sent.astimezone(settings.zone).date())


def render_email(
    session: Session,
    therapist: Therapist,
    template: EmailTemplate,
    request_ids: Sequence[int],
    settings: Settings,
    *,
    earlier: Email | None = None,
    patients: dict[int, Patient | None] | None = None,
) -> RenderedEmail:
    """The email as the templates make it; ``patients`` when already read for many."""
    if patients is None:
        patients = patients_of(session, request_ids)
    return renderer_for(settings.sender_name).render(
        template.value,
        recipient_of(therapist),
        entries_for(request_ids, patients),
        earlier=earlier_of(earlier, settings),
    )


@dataclasses.dataclass(frozen=True)
class Draft:
    """One email to queue: to whom, which template, about which requests."""

    therapist: Therapist
    template: EmailTemplate
    request_ids: Sequence[int]
    dedup_key: str
    in_reply_to: Email | None = None


def queue_emails(
    session: Session, drafts: Sequence[Draft], *, settings: Settings, now: dt.datetime
) -> list[Email]:
    """Render and queue emails; ``email.queued`` is recorded with each.

    One query for all their patients, one flush for the emails, one statement each for
    their batch rows and their events, however many.
    """
    if not drafts:
        return []
    # Share-locked: serialized with a concurrent patient.erased (see patients_of).
    patients = patients_of(
        session, [rid for draft in drafts for rid in draft.request_ids], lock=True
    )
    emails = []
    for draft in drafts:
        therapist = draft.therapist
        if not therapist.email:
            raise ValueError(f"therapist {therapist.id} has no email address")
        rendered = render_email(
            session,
            therapist,
            draft.template,
            draft.request_ids,
            settings,
            earlier=draft.in_reply_to,
            patients=patients,
        )
        emails.append(
            Email(
                therapist_id=therapist.id,
                template=draft.template,
                dedup_key=draft.dedup_key,
                recipient_email=therapist.email,
                recipient_name=therapist.display_name,
                sender_email=settings.sender_email,
                sender_name=settings.sender_name,
                reply_token=(token := reply_tokens.new_token()),
                reply_to=reply_address(settings, token),
                subject=rendered.subject,
                body_html=rendered.body_html,
                body_text=rendered.body_text,
                message_id=new_message_id(settings.sender_email),
                in_reply_to_email_id=draft.in_reply_to.id if draft.in_reply_to else None,
                status=EmailStatus.QUEUED,
                queued_at=now,
                next_attempt_at=now,
                retry_count=0,
            )
        )
    session.add_all(emails)
    session.flush()
    pairs = list(zip(emails, drafts, strict=True))
    insert_rows(
        session,
        EmailBatch,
        [
            {"email_id": email.id, "placement_request_id": request_id, "priority": priority}
            for email, draft in pairs
            for priority, request_id in enumerate(draft.request_ids, start=1)
        ],
    )
    record_events(
        session,
        [
            EmailQueuedPayload(
                email_id=email.id,
                therapist_id=draft.therapist.id,
                placement_request_ids=list(draft.request_ids),
            )
            for email, draft in pairs
        ],
        occurred_at=now,
    )
    for email in emails:
        # The batch rows were written around the ORM: the next access reads them.
        session.expire(email, ["batches"])
    return emails


def queue_email_for(
    session: Session,
    therapist: Therapist,
    template: EmailTemplate,
    request_ids: Sequence[int],
    *,
    dedup_key: str,
    settings: Settings,
    now: dt.datetime,
    in_reply_to: Email | None = None,
) -> Email:
    """Render and queue one email; ``email.queued`` is recorded with it."""
    draft = Draft(therapist, template, request_ids, dedup_key, in_reply_to)
    return queue_emails(session, [draft], settings=settings, now=now)[0]
