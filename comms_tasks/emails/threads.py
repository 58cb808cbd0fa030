"""What answering emails changes, locked before it is changed: the emails, the emails up
their threads and their scheduled follow-up calls (a call is only ever booked with its
email's lock, so none appears after); their unsent reminders at the answer's turn.

An answer (:func:`comms_tasks.emails.answers.record_response`) applies itself to these
rows: a command's answer locks its own, a poll of the mailbox locks those of its whole
group of messages at once (a few statements, however many messages), and both then take
the same path. Lock order, everywhere: patients, then emails in id order, then their
calls, then their reminders.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, defer
from sqlalchemy.orm.util import identity_key

from comms_tasks.models import Email, EmailStatus, EmailTemplate, PhoneCall, PhoneCallStatus

# A reminder of a reminder is still one thread; more is a loop or a producer's mistake.
MAX_THREAD_DEPTH = 10
UNSENT = (EmailStatus.DRAFT, EmailStatus.QUEUED)


class InThread(Protocol):
    """What walking up a thread reads of an email (an ``Email``, or a row of its columns)."""

    id: int
    therapist_id: int
    template: EmailTemplate
    in_reply_to_email_id: int | None


T = TypeVar("T", bound=InThread)


def followed_up(email: InThread, parent_of: Callable[[int], T | None]) -> list[T]:
    """The emails ``email`` follows up, up its thread, nearest first; ``parent_of`` finds
    one by id (None: not known).

    Only a ``follow_up`` passes its answer on, and asks its original's questions again: a
    confirmation (threaded to the answered email too) asks nothing. The therapist's own
    thread only, at most :data:`MAX_THREAD_DEPTH` up.
    """
    parents: list[T] = []
    seen = {email.id}
    current: InThread = email
    while (
        current.template is EmailTemplate.FOLLOW_UP
        and current.in_reply_to_email_id is not None
        and current.in_reply_to_email_id not in seen
        and len(seen) <= MAX_THREAD_DEPTH
    ):
        parent = parent_of(current.in_reply_to_email_id)
        if parent is None or parent.therapist_id != email.therapist_id:
            break
        seen.add(parent.id)
        parents.append(parent)
        current = parent
    return parents


@dataclasses.dataclass
class Threads:
    """Locked rows, read as they are now; what this transaction changes in them shows."""

    emails: dict[int, Email] = dataclasses.field(default_factory=dict)
    # Scheduled follow-up calls by the id of their email.
    calls: dict[int, list[PhoneCall]] = dataclasses.field(default_factory=dict)
    # The emails that have reminders (in any state): only theirs are read at an answer.
    with_reminders: set[int] = dataclasses.field(default_factory=set)

    def email(self, email_id: int) -> Email | None:
        return self.emails.get(email_id)

    def lock_more(self, session: Session, email_ids: Iterable[int]) -> None:
        """Lock the threads of more emails (one found late); those held stay as they are."""
        wanted = [email_id for email_id in email_ids if email_id not in self.emails]
        if wanted:
            more = lock_threads(session, wanted, held=set(self.emails))
            self.emails.update(more.emails)
            self.calls.update(more.calls)
            self.with_reminders |= more.with_reminders

    def originals_of(self, email: Email) -> list[Email]:
        """The sent emails a reminder follows up, up its thread; nearest first
        (:func:`followed_up`)."""
        return [
            parent
            for parent in followed_up(email, self.emails.get)
            if parent.status is EmailStatus.SENT
        ]

    def scheduled_calls(self, email_id: int) -> list[PhoneCall]:
        return [
            call
            for call in self.calls.get(email_id, ())
            if call.status is PhoneCallStatus.SCHEDULED
        ]

    def unsent_reminders(
        self, session: Session, email_ids: Sequence[int], cutoff: dt.datetime
    ) -> list[Email]:
        """Reminders of ``email_ids`` queued at or before ``cutoff`` and still unsent, locked.

        Read at the answer's turn, not with the thread: a reminder changes to ``queued``
        without its original's lock (a send run gives back one it claimed, an operator
        retries a failed one). Without an autoflush: the rows of a group's earlier
        messages are written with the group; a reminder one of them cancelled is
        cancelled here too (it is the same object) and left out.
        """
        asked = sorted({email_id for email_id in email_ids if email_id in self.with_reminders})
        if not asked:
            return []
        with session.no_autoflush:
            reminders = session.scalars(
                select(Email)
                .where(Email.in_reply_to_email_id.in_(asked))
                .where(Email.template == EmailTemplate.FOLLOW_UP)
                .where(Email.status.in_(UNSENT))
                .order_by(Email.id)
                .options(defer(Email.body_html), defer(Email.body_text))
                .with_for_update()
            ).all()
        return [
            reminder
            for reminder in reminders
            if reminder.status in UNSENT and (reminder.queued_at or reminder.created_at) <= cutoff
        ]


def lock_threads(
    session: Session, email_ids: Iterable[int], *, held: set[int] | None = None
) -> Threads:
    """Lock emails, the emails up their threads (``in_reply_to``) and their scheduled
    calls, each in id order, and note which have reminders: four statements.

    The threads are read unlocked first, level by level (an email's ``in_reply_to`` never
    changes, so an email this session already holds answers without a query), then locked
    in one statement in id order, the order ``patient.erased`` locks a patient's emails
    in: an answer to a reminder never holds the reminder while it waits for its original.
    The locked rows are read as they are now (an erasure may have redacted them since they
    were loaded). ``held``: emails this transaction has locked already, not locked again.
    """
    held = held or set()
    thread: set[int] = set()
    level = {email_id for email_id in email_ids if email_id not in held}
    for _depth in range(MAX_THREAD_DEPTH + 1):
        level -= thread
        if not level:
            break
        thread |= level
        parents: set[int] = set()
        unknown = []
        for email_id in level:
            loaded = session.identity_map.get(identity_key(Email, email_id))
            if isinstance(loaded, Email):
                if loaded.in_reply_to_email_id is not None:
                    parents.add(loaded.in_reply_to_email_id)
            else:
                unknown.append(email_id)
        if unknown:
            parents.update(
                parent
                for parent in session.scalars(
                    select(Email.in_reply_to_email_id)
                    .where(Email.id.in_(sorted(unknown)))
                    .where(Email.in_reply_to_email_id.is_not(None))
                )
                if parent is not None
            )
        level = parents - held
    threads = Threads()
    if not thread:
        return threads
    ids = sorted(thread)
    threads.emails = {
        email.id: email
        for email in session.scalars(
            select(Email)
            .where(Email.id.in_(ids))
            .order_by(Email.id)
            .options(defer(Email.body_html), defer(Email.body_text))
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    }
    for call in session.scalars(
        select(PhoneCall)
        .where(PhoneCall.email_id.in_(ids))
        .where(PhoneCall.status == PhoneCallStatus.SCHEDULED)
        .order_by(PhoneCall.id)
        .with_for_update()
    ):
        if call.email_id is not None:
            threads.calls.setdefault(call.email_id, []).append(call)
    # Which of them have reminders at all (a reminder is only ever queued with its
    # original's lock, so none appears after): the others' answers read none.
    threads.with_reminders = {
        email_id
        for email_id in session.scalars(
            select(Email.in_reply_to_email_id)
            .where(Email.in_reply_to_email_id.in_(ids))
            .where(Email.template == EmailTemplate.FOLLOW_UP)
            .distinct()
        )
        if email_id is not None
    }
    return threads


def lock_thread(session: Session, email_id: int) -> tuple[Email | None, Threads]:
    """One email's thread locked (:func:`lock_threads`); the email, None when there is none."""
    threads = lock_threads(session, [email_id])
    return threads.email(email_id), threads
