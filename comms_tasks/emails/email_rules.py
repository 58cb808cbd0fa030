"""Emails to therapists: the weekly batch, reminders and confirmations, and answers.

Functions take the session and never commit; the tasks own the transactions. Every email
is created through :func:`queue_emails`, which renders it, fixes its Message-ID and
records ``email.queued`` in the same transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from comms_tasks.contracts import received
from comms_tasks.contracts.published import (
    EmailQueuedPayload,
    EmailResponseRecordedPayload,
    OutcomeRecordedPayload,
    ResponseSource,
)
from comms_tasks.db import insert_rows
from comms_tasks.inbound.inbox import Rejected
from comms_tasks.mail.message import new_message_id
from comms_tasks.mail.render import (
    EarlierEmail,
    EmailRenderer,
    PatientEntry,
    Recipient,
    RenderedEmail,
)
from comms_tasks.mailbox.match import new_token, tagged_address
from comms_tasks.models import (
    Email,
    EmailBatch,
    EmailStatus,
    EmailTemplate,
    Patient,
    PhoneCall,
    PhoneCallStatus,
    PlacementRequest,
    PlacementRequestStatus,
    ResponseOutcome,
    Therapist,
    TherapistStatus,
)
from comms_tasks.models.enums import PENDING_REQUEST_STATUSES
from comms_tasks.models.read_models import SUMMARY_FIELDS
from comms_tasks.events.outbox import record_event, record_events
from comms_tasks.settings import Settings
from comms_tasks.rules import batching

log = logging.getLogger(__name__)

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


# --- who may be contacted ------------------------------------------------------------


def reply_address(settings: Settings, token: str) -> str | None:
    """Where the therapist's reply goes: the email's own tagged address, when configured."""
    if settings.reply_address is not None:
        return tagged_address(settings.reply_address, token)
    return settings.reply_to


def bounce_address(settings: Settings, token: str | None) -> str | None:
    """The envelope sender bounces go to (VERP), when configured; else the sender's."""
    if settings.bounce_address is not None and token is not None:
        return tagged_address(settings.bounce_address, token)
    return None


def therapist_facts(
    session: Session, therapist_ids: Sequence[int], now: dt.datetime, settings: Settings
) -> dict[int, batching.TherapistFacts]:
    """The facts of the contact rules for many therapists, in a handful of queries."""
    if not therapist_ids:
        return {}
    therapists = session.scalars(select(Therapist).where(Therapist.id.in_(therapist_ids))).all()
    unsent = set(
        session.scalars(
            select(Email.therapist_id)
            .where(Email.therapist_id.in_(therapist_ids))
            .where(Email.template.in_(COUNTING_TEMPLATES))
            .where(Email.status.in_(UNSENT_STATUSES))
            .distinct()
        )
    )
    # The rules count local days: read what any of the days they look at may hold.
    today = batching.local_day(now, settings.zone)
    window_start = batching.local_midnight(
        today - dt.timedelta(days=settings.contact_interval_days), settings.zone
    )
    last_sent = dict(
        session.execute(
            select(Email.therapist_id, func.max(Email.sent_at))
            .where(Email.therapist_id.in_(therapist_ids))
            .where(Email.template.in_(COUNTING_TEMPLATES))
            .where(Email.status == EmailStatus.SENT)
            .where(Email.sent_at >= window_start)
            .group_by(Email.therapist_id)
        ).all()
    )
    refused = refused_addresses(session, therapist_ids)
    calls: dict[int, list[dt.datetime]] = defaultdict(list)
    # Every live call from today on, not only this week's: the day ``explain`` names must
    # be free of the later ones too (a therapist has a handful of live calls at most).
    calls_from = batching.local_midnight(today, settings.zone)
    for therapist_id, scheduled_at in session.execute(
        select(PhoneCall.therapist_id, PhoneCall.scheduled_at)
        .where(PhoneCall.therapist_id.in_(therapist_ids))
        .where(PhoneCall.status == PhoneCallStatus.SCHEDULED)
        .where(PhoneCall.scheduled_at >= calls_from)
    ):
        calls[therapist_id].append(scheduled_at)
    return {
        therapist.id: batching.TherapistFacts(
            therapist_id=therapist.id,
            status=therapist.status,
            has_email=bool(therapist.email),
            deleted=therapist.deleted_at is not None,
            has_unsent_email=therapist.id in unsent,
            last_sent_at=last_sent.get(therapist.id),
            refused_email_id=refused.get(therapist.id),
            bounced_since=bounced_since(therapist),
            scheduled_calls=tuple(sorted(calls[therapist.id])),
        )
        for therapist in therapists
    }


def bounced_since(therapist: Therapist) -> dt.datetime | None:
    """When the therapist's current address bounced for good, if it did."""
    flagged, current = therapist.undeliverable_email, therapist.email
    if flagged and current and flagged.lower() == current.lower():
        return therapist.undeliverable_since
    return None


def refused_addresses(session: Session, therapist_ids: Sequence[int]) -> dict[int, int]:
    """The therapists whose current address the server refused for good, in two queries.

    Per therapist, the latest email (any template) whose recipient the server refused
    for good (:data:`REFUSED_FOR_GOOD`), unless an email was sent to the address after
    it. An address the therapist service changes is a new address. Other failures do not
    count: the email never reached them, and the next run may ask again.
    """
    at_current = (Email.therapist_id == Therapist.id) & (Email.recipient_email == Therapist.email)
    refused = dict(
        session.execute(
            select(Email.therapist_id, func.max(Email.id))
            .join(Therapist, at_current)
            .where(Email.therapist_id.in_(therapist_ids))
            .where(Email.status == EmailStatus.FAILED)
            .where(Email.error_message.like(f"{REFUSED_FOR_GOOD}%"))
            .group_by(Email.therapist_id)
        ).all()
    )
    if refused:
        sent_since = dict(
            session.execute(
                select(Email.therapist_id, func.max(Email.id))
                .join(Therapist, at_current)
                .where(Email.therapist_id.in_(list(refused)))
                .where(Email.status == EmailStatus.SENT)
                .group_by(Email.therapist_id)
            ).all()
        )
        refused = {
            therapist_id: email_id
            for therapist_id, email_id in refused.items()
            if sent_since.get(therapist_id, 0) < email_id
        }
    return refused


def contactability_of(
    facts: batching.TherapistFacts, now: dt.datetime, settings: Settings
) -> batching.Contactability:
    interval = dt.timedelta(days=settings.contact_interval_days)
    return batching.contactability(
        facts, now, contact_interval=interval, call_window=interval, zone=settings.zone
    )


def _in_live_asking_email() -> object:
    return exists(
        select(EmailBatch.id)
        .join(Email, Email.id == EmailBatch.email_id)
        .where(EmailBatch.placement_request_id == PlacementRequest.id)
        .where(EmailBatch.included.is_(True))
        .where(Email.template.in_(ASKING_TEMPLATES))
        .where(Email.status.not_in(DEAD_STATUSES))
    )


def unasked_requests(
    session: Session, therapist_ids: Sequence[int] | None = None
) -> dict[int, list[batching.OpenRequest]]:
    """Open requests not yet in a live email, per therapist; none of an erased patient."""
    query = (
        select(
            PlacementRequest.therapist_id,
            PlacementRequest.id,
            PlacementRequest.created_at,
            Patient.registered_on,
        )
        .outerjoin(Patient, Patient.id == PlacementRequest.patient_id)
        .where(PlacementRequest.status == PlacementRequestStatus.OPEN)
        .where(Patient.erased_at.is_(None))
        .where(~_in_live_asking_email())  # type: ignore[operator]
    )
    if therapist_ids is not None:
        query = query.where(PlacementRequest.therapist_id.in_(therapist_ids))
    result: dict[int, list[batching.OpenRequest]] = defaultdict(list)
    for therapist_id, request_id, created_at, registered_on in session.execute(query):
        result[therapist_id].append(batching.OpenRequest(request_id, created_at, registered_on))
    return dict(result)


def without_erased_patients(
    session: Session, requests: dict[int, list[batching.OpenRequest]]
) -> dict[int, list[batching.OpenRequest]]:
    """``requests`` less those of erased patients, read under the share lock the batch's
    emails are rendered under (:func:`patients_of`): an erasure committed while the batch
    waited for it leaves its patient out of the batch, not in it as an empty entry."""
    ids = [request.placement_request_id for group in requests.values() for request in group]
    if not ids:
        return requests
    patients = patients_of(session, ids, lock=True)
    kept = {
        therapist_id: [r for r in group if not is_erased(patients.get(r.placement_request_id))]
        for therapist_id, group in requests.items()
    }
    return {therapist_id: group for therapist_id, group in kept.items() if group}


def batch_candidates(session: Session) -> list[int]:
    """Active therapists with an address and open requests not yet in an email."""
    return list(
        session.scalars(
            select(Therapist.id)
            .where(Therapist.status == TherapistStatus.ACTIVE)
            .where(Therapist.email.is_not(None))
            .where(Therapist.deleted_at.is_(None))
            .where(
                exists(
                    select(PlacementRequest.id)
                    .where(PlacementRequest.therapist_id == Therapist.id)
                    .where(PlacementRequest.status == PlacementRequestStatus.OPEN)
                    .where(~_in_live_asking_email())  # type: ignore[operator]
                )
            )
            .order_by(Therapist.id)
        )
    )


# --- rendering ---------------------------------------------------------------------------


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


# --- creating emails -------------------------------------------------------------------


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
                reply_token=(token := new_token()),
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


@dataclasses.dataclass
class BatchReport:
    emails_queued: int = 0
    requests_asked: int = 0
    therapists_skipped: int = 0
    email_ids: list[int] = dataclasses.field(default_factory=list)
    # Therapists whose email could not be written (logged by id; the next run tries again).
    failed_therapist_ids: list[int] = dataclasses.field(default_factory=list)


def lock_therapists(session: Session, therapist_ids: Sequence[int]) -> list[Therapist]:
    """Lock the therapists of this chunk; ones another run holds are left to that run."""
    query = select(Therapist).where(Therapist.id.in_(therapist_ids)).order_by(Therapist.id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


def batch_dedup_keys(
    session: Session, therapist_ids: Sequence[int], run_day: dt.date
) -> dict[int, str]:
    """The key of each therapist's batch email of ``run_day``: the first one still unused.

    The first email of the day is ``batch:<therapist>:<day>``. A therapist is contactable
    again that day only when it was cancelled or failed (a live one blocks them); the next
    one is ``...:2``, then ``...:3``. Two runs that race still pick the same key, so the
    unique index keeps "one email per therapist per day" even then.
    """
    if not therapist_ids:
        return {}
    day = run_day.isoformat()
    used = set(
        session.scalars(
            select(Email.dedup_key)
            .where(Email.therapist_id.in_(therapist_ids))
            .where(Email.dedup_key.like(f"batch:%:{day}%"))
        )
    )
    keys = {}
    for therapist_id in therapist_ids:
        base = key = f"batch:{therapist_id}:{day}"
        attempt = 1
        while key in used:
            attempt += 1
            key = f"{base}:{attempt}"
        keys[therapist_id] = key
    return keys


def batch_chunk(
    session: Session, therapist_ids: Sequence[int], now: dt.datetime, settings: Settings
) -> BatchReport:
    """Queue this week's email for each contactable therapist of ``therapist_ids``."""
    report = BatchReport()
    therapists = lock_therapists(session, therapist_ids)
    locked_ids = [therapist.id for therapist in therapists]
    # Read after locking: a concurrent run that queued an email for one of them committed
    # before we got its lock, so we see that email here.
    facts = therapist_facts(session, locked_ids, now, settings)
    requests = without_erased_patients(session, unasked_requests(session, locked_ids))
    chosen: dict[int, list[batching.OpenRequest]] = {}
    for therapist in therapists:
        open_requests = requests.get(therapist.id)
        if not open_requests:
            continue
        if not contactability_of(facts[therapist.id], now, settings).contactable:
            report.therapists_skipped += 1
            continue
        chosen[therapist.id] = batching.select_batch(open_requests, settings.max_patients_per_email)
    keys = batch_dedup_keys(session, list(chosen), batching.local_day(now, settings.zone))
    drafts = [
        Draft(
            therapist,
            batching.template_for(chosen[therapist.id]),
            [request.placement_request_id for request in chosen[therapist.id]],
            dedup_key=keys[therapist.id],
        )
        for therapist in therapists
        if therapist.id in chosen
    ]
    for email, draft in _queue_each_alone_on_error(session, drafts, settings, now, report):
        report.emails_queued += 1
        report.requests_asked += len(draft.request_ids)
        report.email_ids.append(email.id)
    return report


def _queue_each_alone_on_error(
    session: Session,
    drafts: Sequence[Draft],
    settings: Settings,
    now: dt.datetime,
    report: BatchReport,
) -> list[tuple[Email, Draft]]:
    """All drafts in one flush; if that fails, each in its own savepoint.

    One therapist's problem (a value the database refuses, a template that cannot render
    their data) then costs only their email: it is logged by therapist id and the others
    of the chunk are queued. The usual case stays one savepoint and one flush.
    """
    if not drafts:
        return []
    try:
        with session.begin_nested():
            emails = queue_emails(session, drafts, settings=settings, now=now)
        return list(zip(emails, drafts, strict=True))
    except Exception as exc:  # noqa: BLE001 - which draft it was is found out one by one below
        log.warning(
            "batch: %d emails failed together (%s); queuing them one by one",
            len(drafts),
            describe_error(exc),
        )
    queued = []
    for draft in drafts:
        try:
            with session.begin_nested():
                [email] = queue_emails(session, [draft], settings=settings, now=now)
        except Exception as exc:  # noqa: BLE001 - one therapist must not stop the others
            report.failed_therapist_ids.append(draft.therapist.id)
            log.error(
                "batch: no email for therapist %s: %s", draft.therapist.id, describe_error(exc)
            )
            continue
        queued.append((email, draft))
    return queued


def describe_error(exc: BaseException) -> str:
    """The error's kind and the constraint it broke; never its message.

    A database's message may quote the refused row (a body, a patient's summary).
    """
    name = type(exc).__name__
    orig = getattr(exc, "orig", None)
    if orig is None:
        return name
    constraint = getattr(getattr(orig, "diag", None), "constraint_name", None)
    return f"{name} ({type(orig).__name__}{f' on {constraint}' if constraint else ''})"


def preview_batch(
    session: Session, therapist_id: int, now: dt.datetime, settings: Settings
) -> tuple[batching.Contactability, EmailTemplate | None, list[int], RenderedEmail | None]:
    """What the next batch would send this therapist; nothing is stored."""
    therapist = session.get(Therapist, therapist_id)
    if therapist is None:
        raise LookupError(f"therapist {therapist_id} is not known")
    facts = therapist_facts(session, [therapist_id], now, settings)[therapist_id]
    verdict = contactability_of(facts, now, settings)
    open_requests = unasked_requests(session, [therapist_id]).get(therapist_id, [])
    chosen = batching.select_batch(open_requests, settings.max_patients_per_email)
    if not chosen:
        return verdict, None, [], None
    template = batching.template_for(chosen)
    request_ids = [request.placement_request_id for request in chosen]
    rendered = render_email(session, therapist, template, request_ids, settings)
    return verdict, template, request_ids, rendered


# --- answers ----------------------------------------------------------------------------


def queue_confirmation(
    session: Session,
    therapist: Therapist,
    request_id: int,
    now: dt.datetime,
    settings: Settings,
    in_reply_to: Email | None = None,
) -> Email | None:
    """The confirmation of one accepted request, once; outside the weekly limit."""
    dedup_key = f"confirmation:{request_id}"
    if session.scalar(select(Email.id).where(Email.dedup_key == dedup_key)) is not None:
        return None
    if not therapist.email:
        return None
    return queue_email_for(
        session,
        therapist,
        EmailTemplate.CONFIRMATION,
        [request_id],
        dedup_key=dedup_key,
        settings=settings,
        now=now,
        in_reply_to=in_reply_to,
    )


def record_outcome(
    session: Session,
    therapist_id: int,
    therapist: Therapist | None,
    request_id: int,
    outcome: ResponseOutcome,
    *,
    via: Literal["email", "call"],
    source_id: int,
    now: dt.datetime,
    settings: Settings,
    in_reply_to: Email | None = None,
) -> int | None:
    """Publish one request's outcome; an acceptance queues its confirmation (its id)."""
    record_event(
        session,
        OutcomeRecordedPayload(
            placement_request_id=request_id,
            therapist_id=therapist_id,
            outcome=outcome.value,
            via=via,
            source_id=source_id,
        ),
        occurred_at=now,
    )
    if outcome is not ResponseOutcome.ACCEPTED or therapist is None:
        return None
    confirmation = queue_confirmation(
        session, therapist, request_id, now, settings, in_reply_to=in_reply_to
    )
    return confirmation.id if confirmation else None


def known_therapist(session: Session, therapist_id: int, command_id: str) -> Therapist:
    """The therapist a command names, or the command is rejected."""
    therapist = session.get(Therapist, therapist_id)
    if therapist is None or therapist.deleted_at is not None:
        raise Rejected("command.therapist_id: unknown therapist", command_id)
    return therapist


def check_requests_of(
    session: Session, therapist_id: int, request_ids: Sequence[int], command_id: str
) -> None:
    """Every id names a distinct request of this therapist, or the command is rejected."""
    owners = dict(
        session.execute(
            select(PlacementRequest.id, PlacementRequest.therapist_id).where(
                PlacementRequest.id.in_(list(request_ids))
            )
        ).all()
    )
    for index, request_id in enumerate(request_ids):
        if owners.get(request_id) != therapist_id:
            raise Rejected(
                f"command.placement_request_ids[{index}]: unknown request of this therapist",
                command_id,
            )
    if len(set(request_ids)) != len(request_ids):
        raise Rejected("command.placement_request_ids: contains duplicates", command_id)


def record_response(
    session: Session,
    command: received.RecordEmailResponse,
    now: dt.datetime,
    settings: Settings,
    source: ResponseSource = "message",
    known_at: dt.datetime | None = None,
) -> list[int]:
    """Apply a therapist's answer; returns the ids of confirmation emails it queued.

    ``source`` says where it came from: a command of another service (``message``), the
    mailbox or an operator; all three take this path. ``known_at`` is when the service
    learned of the answer, when that is later than ``received_at`` (the mailbox: a reply
    is read minutes or hours after its Date): reminders queued before then are cancelled.
    """
    # Lock order (patients -> emails), like patient.erased: the answered requests'
    # patients share-locked first (a confirmation renders them), then the whole thread,
    # the email and the originals it follows up, in id order (see lock_thread).
    patients_of(session, [item.placement_request_id for item in command.outcomes], lock=True)
    email = lock_thread(session, command.email_id)
    if email is None:
        raise Rejected("command.email_id: unknown email", str(command.command_id))
    if email.status is not EmailStatus.SENT:
        # Nobody was asked yet (or ever): kept as a dead letter, replayable once it is sent.
        raise Rejected(
            f"command.email_id: the email was not sent ({email.status.value})",
            str(command.command_id),
        )
    # An answer without outcomes (a reply read from the mailbox) reads no batch rows.
    batches = (
        {batch.placement_request_id: batch for batch in email.batches} if command.outcomes else {}
    )
    for index, item in enumerate(command.outcomes):
        if item.placement_request_id not in batches:
            raise Rejected(
                f"command.outcomes[{index}].placement_request_id: not asked about in this email",
                str(command.command_id),
            )
    received_at = command.received_at
    email.response_received = True
    # A redacted email keeps no answer text (erasure and retention are final).
    keep_text = email.body_redacted_at is None
    if _not_older(email.response_date, received_at):
        # The email shows its newest answer; an older one only fills in outcomes.
        email.response_date = received_at
        email.response_content = command.content if keep_text else None
    record_event(
        session,
        EmailResponseRecordedPayload(
            email_id=email.id,
            therapist_id=email.therapist_id,
            received_at=received_at,
            source=source,
        ),
        occurred_at=now,
    )
    therapist = session.get(Therapist, email.therapist_id) if command.outcomes else None
    originals = originals_of(session, email)
    confirmations = []
    for item in command.outcomes:
        batch = batches[item.placement_request_id]
        if not _not_older(batch.response_received_at, received_at):
            # A newer answer already decided this request: nothing to publish or confirm.
            continue
        outcome = ResponseOutcome(item.outcome)
        batch.response_outcome = outcome
        batch.response_notes = item.notes if keep_text else None
        batch.response_received_at = received_at
        for original in originals:
            # The reminder asked the original's questions again: its answer answers them.
            for asked in original.batches:
                if asked.placement_request_id == item.placement_request_id and _not_older(
                    asked.response_received_at, received_at
                ):
                    asked.response_outcome = outcome
                    asked.response_received_at = received_at
        confirmation = record_outcome(
            session,
            email.therapist_id,
            therapist,
            item.placement_request_id,
            outcome,
            via="email",
            source_id=email.id,
            now=now,
            settings=settings,
            in_reply_to=email,
        )
        if confirmation is not None:
            confirmations.append(confirmation)
    cancel_follow_up_calls(session, email.id)
    for original in originals:
        original.response_received = True
        if _not_older(original.response_date, received_at):
            original.response_date = received_at
        cancel_follow_up_calls(session, original.id)
    cancel_unsent_reminders(
        session,
        [email.id, *(original.id for original in originals)],
        max(received_at, known_at) if known_at is not None else received_at,
    )
    return confirmations


def cancel_unsent_reminders(
    session: Session, email_ids: Sequence[int], received_at: dt.datetime
) -> int:
    """An answered email needs no reminder: the ones not yet on the wire are cancelled.

    Only reminders queued before the answer was received: one asked for later was asked
    knowing of it (a late older answer, or a re-sent one, must not drop it). One already
    ``sending`` is left to its send's result: it may be on the wire.
    """
    reminders = session.scalars(
        select(Email)
        .where(Email.in_reply_to_email_id.in_(email_ids))
        .where(func.coalesce(Email.queued_at, Email.created_at) <= received_at)
        .where(Email.template == EmailTemplate.FOLLOW_UP)
        .where(Email.status.in_((EmailStatus.DRAFT, EmailStatus.QUEUED)))
        .order_by(Email.id)
        .with_for_update()
    ).all()
    for reminder in reminders:
        cancel_unsent(reminder, "cancelled: the email it follows up was answered")
    return len(reminders)


def cancel_unsent(email: Email, reason: str) -> None:
    """An email that is not on the wire will not be sent; ``reason`` says why."""
    email.status = EmailStatus.CANCELLED
    email.lease_expires_at = None
    email.next_attempt_at = None
    email.error_message = reason


def _not_older(recorded: dt.datetime | None, received_at: dt.datetime) -> bool:
    """Whether an answer received at ``received_at`` may replace what was recorded.

    Like events (``read_models._is_stale``): the same time applies, the later delivery wins.
    """
    return recorded is None or received_at >= recorded


# A reminder of a reminder is still one thread; more is a loop or a producer's mistake.
MAX_THREAD_DEPTH = 10


def lock_thread(session: Session, email_id: int) -> Email | None:
    """Lock an email and the emails up its thread (``in_reply_to``), in id order.

    The thread is read unlocked first (an email's ``in_reply_to`` never changes, so an
    email this session already holds answers without a query), then locked in one
    statement in id order, the order ``patient.erased`` locks a patient's emails in: an
    answer to a reminder never holds the reminder while it waits for its original. The
    locked rows are read as they are now (an erasure may have redacted them since they
    were loaded); returns the email itself, None when there is none.
    """
    thread = {email_id}
    current: int | None = email_id
    while current is not None and len(thread) <= MAX_THREAD_DEPTH:
        loaded = session.identity_map.get(identity_key(Email, current))
        if isinstance(loaded, Email):
            current = loaded.in_reply_to_email_id
        else:
            current = session.scalar(select(Email.in_reply_to_email_id).where(Email.id == current))
        if current is None or current in thread:
            break
        thread.add(current)
    locked = session.scalars(
        select(Email)
        .where(Email.id.in_(sorted(thread)))
        .order_by(Email.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    return next((email for email in locked if email.id == email_id), None)


def originals_of(session: Session, email: Email) -> list[Email]:
    """The sent emails a reminder follows up, up its thread, locked; nearest first.

    Only a ``follow_up`` passes its answer on: it repeats its original's questions. A
    confirmation (threaded to the answered email too) asks nothing.
    """
    originals: list[Email] = []
    seen = {email.id}
    current = email
    while (
        current.template is EmailTemplate.FOLLOW_UP
        and current.in_reply_to_email_id is not None
        and current.in_reply_to_email_id not in seen
        and len(seen) <= MAX_THREAD_DEPTH
    ):
        parent = session.get(Email, current.in_reply_to_email_id, with_for_update=True)
        if parent is None or parent.therapist_id != email.therapist_id:
            break
        seen.add(parent.id)
        if parent.status is EmailStatus.SENT:
            originals.append(parent)
        current = parent
    return originals


def cancel_follow_up_calls(session: Session, email_id: int) -> int:
    """An answer makes the follow-up call of its email pointless."""
    calls = session.scalars(
        select(PhoneCall)
        .where(PhoneCall.email_id == email_id)
        .where(PhoneCall.status == PhoneCallStatus.SCHEDULED)
        .order_by(PhoneCall.id)
        .with_for_update()
    ).all()
    for call in calls:
        call.status = PhoneCallStatus.CANCELLED
        call.notes = "cancelled: the email was answered"
    return len(calls)


def queue_requested_email(
    session: Session, command: received.QueueEmail, now: dt.datetime, settings: Settings
) -> list[Email]:
    """``comms.queue_email``: a follow-up or confirmations for given requests.

    A ``follow_up`` is one email per command (the command id is its key). A
    ``confirmation`` is one per request, whatever command asks (``confirmation:<id>``, as
    when an answer or a call accepts it): requests already confirmed are left out, and a
    command that finds all of them confirmed queues nothing. Returns what it queued.
    """
    command_id = str(command.command_id)
    therapist = known_therapist(session, command.therapist_id, command_id)
    if not therapist.email:
        raise Rejected("command.therapist_id: the therapist has no email address", command_id)
    check_requests_of(session, therapist.id, command.placement_request_ids, command_id)
    original = None
    if command.reply_to_email_id is not None:
        original = session.get(Email, command.reply_to_email_id)
        if original is None or original.therapist_id != therapist.id:
            raise Rejected("command.reply_to_email_id: unknown email of this therapist", command_id)
        if original.status is not EmailStatus.SENT:
            # A reminder of (or a thread to) an email nobody received; replayable once sent.
            raise Rejected(
                f"command.reply_to_email_id: the email was not sent ({original.status.value})",
                command_id,
            )
    template = EmailTemplate(command.template)
    if template is EmailTemplate.CONFIRMATION:
        return _queue_requested_confirmations(
            session, therapist, command.placement_request_ids, command_id, now, settings, original
        )
    if original is None:
        raise Rejected(
            "command.reply_to_email_id: a follow_up needs the original email", command_id
        )
    return [
        queue_email_for(
            session,
            therapist,
            template,
            list(command.placement_request_ids),
            dedup_key=f"command:{command_id}",
            settings=settings,
            now=now,
            in_reply_to=original,
        )
    ]


# A request that ended so is never confirmed: the therapist would be told of a placement
# that does not exist.
NOT_CONFIRMABLE = (PlacementRequestStatus.REJECTED, PlacementRequestStatus.CANCELLED)


def _queue_requested_confirmations(
    session: Session,
    therapist: Therapist,
    request_ids: Sequence[int],
    command_id: str,
    now: dt.datetime,
    settings: Settings,
    original: Email | None,
) -> list[Email]:
    # Lock order (patients -> requests), like patient.erased: the patients share-locked
    # before the requests are locked (queue_confirmation share-locks them again).
    patients_of(session, request_ids, lock=True)
    statuses = dict(
        session.execute(
            select(PlacementRequest.id, PlacementRequest.status)
            .where(PlacementRequest.id.in_(list(request_ids)))
            .order_by(PlacementRequest.id)
            # Locked (in id order) so that a cancellation waits until the confirmation is
            # queued, or is seen here.
            .with_for_update()
        ).all()
    )
    for index, request_id in enumerate(request_ids):
        status = statuses[request_id]
        if status in NOT_CONFIRMABLE:
            raise Rejected(
                f"command.placement_request_ids[{index}]: the request is {status.value}",
                command_id,
            )
    queued = []
    for request_id in request_ids:
        confirmation = queue_confirmation(
            session, therapist, request_id, now, settings, in_reply_to=original
        )
        if confirmation is not None:
            queued.append(confirmation)
    return queued


def requests_still_pending(
    session: Session, request_ids: Iterable[int], *, lock: bool = False
) -> set[int]:
    """Those of ``request_ids`` still open or in progress.

    ``lock``: share-locked until the booking commits, in id order (so that bookings never
    deadlock). A status change locks its request before it withdraws the request from
    calls (``calls.withdraw_request_from_calls``): it waits for a booking that read the
    request as pending, and then sees and cancels its call; or the booking waits for the
    change and no longer reads the request as pending.
    """
    ids = sorted(set(request_ids))
    if not ids:
        return set()
    query = (
        select(PlacementRequest.id)
        .where(PlacementRequest.id.in_(ids))
        .where(PlacementRequest.status.in_(PENDING_REQUEST_STATUSES))
    )
    if lock:
        query = query.order_by(PlacementRequest.id).with_for_update(read=True)
    return set(session.scalars(query))
