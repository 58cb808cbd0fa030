"""A group of messages from the mailbox, read, then made ready to be recorded together.

Reading a message (parsing, classifying, the keys it offers for matching) needs no
database. What recording needs from it is then read for the whole group at once: the
group's messages kept before, the emails their tokens and thread headers name, those
emails' threads locked (:func:`~comms_tasks.emails.threads.lock_threads`), and the
messages already applied to them. A handful of statements per group rather than a handful
per message; each message is then recorded at its turn
(:func:`comms_tasks.mailbox.apply.record_mail`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from email.message import Message

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from comms_tasks.emails.threads import Threads, lock_threads
from comms_tasks.mailbox import _mime, email_lookup
from comms_tasks.mailbox.classify import Classified, MailKind, classify, parse
from comms_tasks.mailbox.match import MatchKeys, keys
from comms_tasks.mailbox.sources import Fetched
from comms_tasks.models import Email, InboundMail, InboundMailKind, InboundMailState
from comms_tasks.settings import Settings


@dataclasses.dataclass(frozen=True)
class Reading:
    """One message as read: what it is and what it names. ``classified`` is None for a
    message fetched by its header only (too large)."""

    fetched: Fetched
    classified: Classified | None = None
    keys: MatchKeys = dataclasses.field(default_factory=MatchKeys)
    subject: str | None = None
    message_id: str | None = None
    date: str | None = None

    @property
    def matchable(self) -> bool:
        return self.classified is not None and self.classified.kind is not MailKind.UNRELATED


def _header(message: Message | None, name: str) -> str | None:
    """A stranger's header as text: unfolded, bounded, encoded words decoded."""
    value = None if message is None else _mime.first_header(message, name)
    return None if value is None else _mime.decoded(value)


def read(fetched: Fetched, settings: Settings) -> Reading:
    """Parse, classify and take the matching keys of one message; no database."""
    if fetched.headers_only:
        return Reading(fetched)
    message = parse(fetched.raw)
    classified = classify(fetched.raw, parsed=message)
    return Reading(
        fetched,
        classified,
        keys(
            message if message is not None else fetched.raw,
            classified,
            reply_address=settings.reply_address,
            bounce_address=settings.bounce_address,
        ),
        subject=_header(message, "Subject"),
        message_id=_header(message, "Message-ID"),
        date=_header(message, "Date"),
    )


class SeenBefore:
    """The rows of a group's messages already kept, read in one query for the group.

    A message is known by where the mailbox keeps it or by its bytes' hash; the rows the
    group adds are added here too, so that the same bytes twice in one group are applied
    once. A message recorded alone is a group of one.
    """

    def __init__(self, session: Session, source: str, group: Sequence[Fetched]) -> None:
        self.source = source
        source_keys = sorted({fetched.key for fetched in group})
        hashes = sorted({fetched.sha256 for fetched in group})
        rows = session.scalars(
            select(InboundMail).where(
                or_(
                    (InboundMail.source == source) & InboundMail.source_key.in_(source_keys),
                    InboundMail.raw_sha256.in_(hashes),
                )
            )
        ).all()
        self._by_key: dict[str, InboundMail] = {}
        self._by_hash: dict[str, InboundMail] = {}
        for row in rows:
            self.add(row)

    def add(self, mail: InboundMail) -> None:
        if mail.source == self.source:
            self._by_key.setdefault(mail.source_key, mail)
        self._by_hash.setdefault(mail.raw_sha256, mail)

    def find(self, fetched: Fetched) -> InboundMail | None:
        return self._by_key.get(fetched.key) or self._by_hash.get(fetched.sha256)


@dataclasses.dataclass(frozen=True)
class EarlierMail:
    """A message applied to an email before this group: what knows it as a copy."""

    id: int
    kind: InboundMailKind
    message_id: str | None
    sender: str | None


class Group:
    """What recording a group's messages reads, read for all of them at once.

    The emails are found without a lock, then locked with their threads and read again as
    they are now: an erasure that committed in between is seen. The emails a message
    could match by its sender alone are locked with them; which one it matches is decided
    at its turn (an earlier reply of the group may have answered it), and one that was
    not sent yet at the start is locked then.
    """

    def __init__(self, session: Session, source: str, readings: Sequence[Reading]) -> None:
        self.seen = SeenBefore(session, source, [reading.fetched for reading in readings])
        new = [
            reading
            for reading in readings
            if reading.matchable and self.seen.find(reading.fetched) is None
        ]
        self.candidates = email_lookup.find_emails(session, [reading.keys for reading in new])
        # Those a message may match by its sender alone are locked with the others, in
        # id order: locked at its turn, after higher ids, one could deadlock with the
        # booking (which locks the emails waiting for a call in id order).
        by_sender = email_lookup.sender_candidates(
            session,
            [
                reading.keys.sender
                for reading in new
                if reading.keys.sender
                and reading.classified is not None
                and InboundMailKind(reading.classified.kind.value) in email_lookup.SENDER_KINDS
                and not email_lookup.is_named(self.candidates, reading.keys)
            ],
        )
        self.threads: Threads = lock_threads(session, sorted(self.candidates.emails() | by_sender))
        # The messages applied to those emails before: a handful each, by their index.
        self._applied: dict[int, list[EarlierMail | InboundMail]] = {}
        self._read_applied(session, sorted(self.threads.emails))

    def found(
        self, session: Session, found_keys: MatchKeys, kind: InboundMailKind
    ) -> email_lookup.Found | None:
        """The email a message answers, its thread locked."""
        found = email_lookup.found_among(self.candidates, self.threads.emails, found_keys, kind)
        if found is None:
            found = email_lookup.find_by_sender(session, found_keys, kind)
            if found is not None and found.email.id not in self.threads.emails:
                self.threads.lock_more(session, [found.email.id])
                self._read_applied(session, [found.email.id])
        return found

    def _read_applied(self, session: Session, email_ids: Sequence[int]) -> None:
        """The messages applied to ``email_ids`` before (their copies' identities only)."""
        if not email_ids:
            return
        for row in session.execute(
            select(
                InboundMail.id,
                InboundMail.email_id,
                InboundMail.kind,
                InboundMail.message_id,
                InboundMail.sender,
            )
            .where(InboundMail.email_id.in_(email_ids))
            .where(InboundMail.state == InboundMailState.MATCHED)
            .order_by(InboundMail.id)
        ):
            self._applied.setdefault(row.email_id, []).append(
                EarlierMail(row.id, row.kind, row.message_id, row.sender)
            )

    def earlier_copy(self, session: Session, mail: InboundMail, email: Email) -> int | None:
        """The id of another copy of ``mail`` already applied to ``email``, if one is.

        One message can reach the mailbox twice with different bytes: a reply to all of
        our sender and our tagged reply address is delivered once per address, each copy
        with a Delivered-To line of its own, so neither the key nor the hash knows it. The
        same Message-ID from the same sender, of the same kind, already applied to the same
        email (before, or earlier in this group) is that message again.
        """
        if mail.message_id is None or mail.sender is None:
            return None
        for copy in self._applied.get(email.id, ()):
            if (
                copy is not mail
                and copy.kind is mail.kind
                and copy.message_id == mail.message_id
                and copy.sender == mail.sender
            ):
                if copy.id is None:
                    session.flush()  # a copy earlier in this group: its id, to name it
                return int(copy.id)
        return None

    def add(self, mail: InboundMail) -> None:
        """A message this group recorded: known as seen, and as applied to its email."""
        self.seen.add(mail)
        if mail.email_id is not None and mail.state is InboundMailState.MATCHED:
            self._applied.setdefault(mail.email_id, []).append(mail)
