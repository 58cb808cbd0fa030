"""Emails to therapists: the weekly batch, reminders and confirmations, and answers.

Functions take the session and never commit; the tasks own the transactions. Every email
is created through :func:`queue_emails`, which renders it, fixes its Message-ID and
records ``email.queued`` in the same transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Sequence

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from comms_tasks.emails import composing
from comms_tasks.mail.render import RenderedEmail
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
    Therapist,
    TherapistStatus,
)
from comms_tasks.rules import batching
from comms_tasks.settings import Settings

log = logging.getLogger(__name__)

# --- who may be contacted ------------------------------------------------------------


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
            .where(Email.template.in_(composing.COUNTING_TEMPLATES))
            .where(Email.status.in_(composing.UNSENT_STATUSES))
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
            .where(Email.template.in_(composing.COUNTING_TEMPLATES))
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
            .where(Email.error_message.like(f"{composing.REFUSED_FOR_GOOD}%"))
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
        .where(Email.template.in_(composing.ASKING_TEMPLATES))
        .where(Email.status.not_in(composing.DEAD_STATUSES))
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
    patients = composing.patients_of(session, ids, lock=True)
    kept = {
        therapist_id: [
            r for r in group if not composing.is_erased(patients.get(r.placement_request_id))
        ]
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


# --- creating emails -------------------------------------------------------------------


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
        composing.Draft(
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
    drafts: Sequence[composing.Draft],
    settings: Settings,
    now: dt.datetime,
    report: BatchReport,
) -> list[tuple[Email, composing.Draft]]:
    """All drafts in one flush; if that fails, each in its own savepoint.

    One therapist's problem (a value the database refuses, a template that cannot render
    their data) then costs only their email: it is logged by therapist id and the others
    of the chunk are queued. The usual case stays one savepoint and one flush.
    """
    if not drafts:
        return []
    try:
        with session.begin_nested():
            emails = composing.queue_emails(session, drafts, settings=settings, now=now)
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
                [email] = composing.queue_emails(session, [draft], settings=settings, now=now)
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
    rendered = composing.render_email(session, therapist, template, request_ids, settings)
    return verdict, template, request_ids, rendered


# --- answers ----------------------------------------------------------------------------
