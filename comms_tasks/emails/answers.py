"""A therapist's answer to an email: the response, outcomes per request, confirmations,
reminders and follow-up calls cancelled; emails other services ask for."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from comms_tasks.contracts import Rejected, received
from comms_tasks.contracts.published import (
    EmailResponseRecordedPayload,
    OutcomeRecordedPayload,
    ResponseSource,
)
from comms_tasks.emails import composing
from comms_tasks.emails.threads import MAX_THREAD_DEPTH, Threads, followed_up, lock_thread
from comms_tasks.events.outbox import record_event
from comms_tasks.models import (
    Email,
    EmailStatus,
    EmailTemplate,
    PhoneCallStatus,
    ResponseOutcome,
    Therapist,
)
from comms_tasks.settings import Settings


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
    return composing.queue_email_for(
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


def record_response(
    session: Session,
    command: received.RecordEmailResponse,
    now: dt.datetime,
    settings: Settings,
    source: ResponseSource = "message",
    known_at: dt.datetime | None = None,
    threads: Threads | None = None,
) -> list[int]:
    """Apply a therapist's answer; returns the ids of confirmation emails it queued.

    ``source`` says where it came from: a command of another service (``message``), the
    mailbox or an operator; all three take this path. ``known_at`` is when the service
    learned of the answer, when that is later than ``received_at`` (the mailbox: a reply
    is read minutes or hours after its Date): reminders queued before then are cancelled.
    ``threads``: the email's rows, locked already by the caller (a poll locks those of a
    group of messages at once, :func:`~comms_tasks.emails.threads.lock_threads`); an
    answer with outcomes locks its own, since its patients are locked first.
    """
    if threads is None:
        # Lock order (patients -> emails), like patient.erased: the answered requests'
        # patients share-locked first (a confirmation renders them), then the whole
        # thread, the email and the originals it follows up, in id order.
        composing.patients_of(
            session, [item.placement_request_id for item in command.outcomes], lock=True
        )
        email, threads = lock_thread(session, command.email_id)
    elif command.outcomes:
        raise ValueError("an answer with outcomes locks its patients before its emails")
    else:
        email = threads.email(command.email_id)
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
    originals = threads.originals_of(email)
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
    cancel_follow_up_calls(threads, email.id)
    for original in originals:
        original.response_received = True
        if _not_older(original.response_date, received_at):
            original.response_date = received_at
        cancel_follow_up_calls(threads, original.id)
    cutoff = max(received_at, known_at) if known_at is not None else received_at
    # A reminder on its way was queued by now: an answer dated ahead (a producer's clock)
    # voids none asked for after it was recorded.
    void_until = min(cutoff, now)
    for answered in (email, *originals):
        # For a reminder on its way now, given back unsent later: the claim cancels it.
        if answered.reminders_void_until is None or answered.reminders_void_until < void_until:
            answered.reminders_void_until = void_until
    cancel_unsent_reminders(
        session, threads, [email.id, *(original.id for original in originals)], cutoff
    )
    return confirmations


def cancel_unsent_reminders(
    session: Session, threads: Threads, email_ids: Sequence[int], received_at: dt.datetime
) -> int:
    """An answered email needs no reminder: the ones not yet on the wire are cancelled.

    Only reminders queued before the answer was received: one asked for later was asked
    knowing of it (a late older answer, or a re-sent one, must not drop it). One already
    ``sending`` is left to its send's result: it may be on the wire; given back unsent,
    the claim cancels it (:func:`voided_reminders`).
    """
    reminders = threads.unsent_reminders(session, email_ids, received_at)
    for reminder in reminders:
        cancel_unsent(reminder, REMINDER_VOIDED)
    return len(reminders)


def cancel_follow_up_calls(threads: Threads, email_id: int) -> int:
    """An answer makes the follow-up call of its email pointless."""
    calls = threads.scheduled_calls(email_id)
    for call in calls:
        call.status = PhoneCallStatus.CANCELLED
        call.notes = "cancelled: the email was answered"
    return len(calls)


REMINDER_VOIDED = "cancelled: the email it follows up was answered"


def voided_reminders(
    session: Session, emails: Sequence[Email], loaded: Mapping[int, Email]
) -> set[int]:
    """The reminders among ``emails`` that an answer voids: one to an email the reminder
    follows up (:func:`~comms_tasks.emails.threads.followed_up`, the emails an answer to
    it marks answered), known by the time the reminder was queued (their
    ``reminders_void_until``). ``loaded``: emails of the threads read already; the rest
    are read level by level, a statement per level.
    """
    reminders = [email for email in emails if email.template is EmailTemplate.FOLLOW_UP]
    # Emails, or rows of the columns the walk reads.
    up: dict[int, Any] = dict(loaded)
    level = {
        email.in_reply_to_email_id for email in reminders if email.in_reply_to_email_id is not None
    }
    walked: set[int] = set()
    for _depth in range(MAX_THREAD_DEPTH + 1):
        level -= walked
        if not level:
            break
        walked |= level
        unknown = sorted(level - up.keys())
        if unknown:
            rows = session.execute(
                select(
                    Email.id,
                    Email.therapist_id,
                    Email.template,
                    Email.in_reply_to_email_id,
                    Email.reminders_void_until,
                ).where(Email.id.in_(unknown))
            ).all()
            up.update((row.id, row) for row in rows)
        # Only a follow_up passes an answer on: the walk goes up through those alone.
        level = {
            up[email_id].in_reply_to_email_id
            for email_id in level
            if email_id in up
            and up[email_id].template is EmailTemplate.FOLLOW_UP
            and up[email_id].in_reply_to_email_id is not None
        }
    voided = set()
    for reminder in reminders:
        queued = reminder.queued_at or reminder.created_at
        if any(
            parent.reminders_void_until is not None and queued <= parent.reminders_void_until
            for parent in followed_up(reminder, up.get)
        ):
            voided.add(reminder.id)
    return voided


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
