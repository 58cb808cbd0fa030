"""``comms.poll_mailbox``: read new mail, apply each message once, then file it away.

Each message is classified and matched, then recorded with its events in the
transaction of its group (up to :data:`GROUP_SIZE` messages: a commit per group, not per
message); only after that commit are the group's messages moved to the folders of their
kinds. A crash in between leaves them in the inbox: the next poll finds their rows and
moves them, applying nothing twice. A group that fails (one message raising, a deadlock
with an erasure) is rolled back whole and its messages recorded again one transaction
each, where one that cannot be recorded is kept as unmatched with its reason. Nothing is
ever deleted from the mailbox. One poll at a time: a second one that starts while the
first runs returns at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy import text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from comms_tasks.app import app
from comms_tasks.db import get_engine, transaction
from comms_tasks.mailbox import apply, groups, redaction
from comms_tasks.mailbox.sources import FOLDERS, Fetched, MailboxError, StaleKeyError, open_source
from comms_tasks.models import InboundMail, InboundMailKind, InboundMailState, MailboxPoll
from comms_tasks.models.base import utcnow
from comms_tasks.models.inbound_mail import MAX_REASON
from comms_tasks.settings import Settings, get_settings
from comms_tasks.task_names import POLL_MAILBOX

# pg_try_advisory_lock key of the poll (the claim and booking locks have their own).
POLL_LOCK_KEY = 7_310_642_205
# Messages recorded in one transaction. A group holds the locks of its emails until its
# commit (about 0.15 s for 100 messages of the bench's mix): an answer or an erasure of
# one of them waits that long at most.
GROUP_SIZE = 100
log = logging.getLogger(__name__)


@contextlib.contextmanager
def poll_lock(settings: Settings) -> Iterator[bool]:
    """Whether this process may poll: one poll at a time, across workers.

    PostgreSQL: a session advisory lock on a connection of its own, held for the whole
    poll (its transactions come and go). SQLite runs on one machine: a lock file.
    """
    engine = get_engine()
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            held = bool(
                connection.execute(
                    text("SELECT pg_try_advisory_lock(:key)"), {"key": POLL_LOCK_KEY}
                ).scalar()
            )
            connection.commit()
            try:
                yield held
            finally:
                if held:
                    connection.execute(
                        text("SELECT pg_advisory_unlock(:key)"), {"key": POLL_LOCK_KEY}
                    )
                    connection.commit()
        return
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    with (settings.var_dir / "mailbox.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def folder_for(kind: InboundMailKind, state: InboundMailState) -> str:
    if state is not InboundMailState.MATCHED:
        return FOLDERS["unmatched"]
    if kind is InboundMailKind.DELAYED:
        return FOLDERS["bounce"]  # delayed and permanent bounces share their folder
    return FOLDERS[kind.value]


def record(
    session: Session,
    source_name: str,
    reading: groups.Reading,
    settings: Settings,
    group: groups.Group,
) -> apply.Recorded:
    """Record one message of ``group`` in ``session``'s transaction (not flushed yet)."""
    if reading.classified is None:
        return keep(session, source_name, reading.fetched, too_large(reading.fetched), group.seen)
    return apply.record_mail(
        session, source_name, reading, now=utcnow(), settings=settings, group=group
    )


def too_large(fetched: Fetched) -> str:
    return f"too large ({fetched.size} bytes): header kept"


def keep(
    session: Session,
    source_name: str,
    fetched: Fetched,
    reason: str,
    seen: groups.SeenBefore,
) -> apply.Recorded:
    """A message kept as unmatched with the reason (once), in ``session``'s transaction."""
    now = utcnow()
    known = seen.find(fetched)
    if known is not None:
        return apply.Recorded(known, new=False)
    mail = InboundMail.new(
        source=source_name,
        source_key=fetched.key,
        raw_sha256=fetched.sha256,
        size=len(fetched.raw),
        fetched_at=now,
        received_at=now,
        kind=InboundMailKind.UNRELATED,
        state=InboundMailState.UNMATCHED,
        defect=reason[:MAX_REASON],
        raw=fetched.raw,
    )
    session.add(mail)
    seen.add(mail)
    return apply.Recorded(mail, new=True)


def recording(
    source_name: str, readings: list[groups.Reading], settings: Settings
) -> list[apply.Applied]:
    """Record messages in one transaction (with the lock an erasure waits for): what the
    group needs read and locked at once, each message at its turn, their rows together."""
    with transaction() as session:
        redaction.lock_for_recording(session)
        group = groups.Group(session, source_name, readings)
        recorded = [record(session, source_name, reading, settings, group) for reading in readings]
        session.flush()
        return [each.applied() for each in recorded]


def keep_unreadable(source_name: str, fetched: Fetched, reason: str) -> apply.Applied:
    """A message whose recording failed: kept as unmatched with the reason, once."""
    with transaction() as session:
        redaction.lock_for_recording(session)
        seen = groups.SeenBefore(session, source_name, [fetched])
        kept = keep(session, source_name, fetched, reason, seen)
        session.flush()
        return kept.applied()


def record_poll(
    source_name: str, fetched: int, error: str | None, moved: dict[str, list[int]]
) -> None:
    """The poll's row, and where each message it moved went (one statement per folder).

    Written once per poll, not per message: a poll that dies first leaves the folders
    unwritten, and the next poll, finding those messages again, moves and writes them.
    """
    now = utcnow()
    with transaction() as session:
        session.merge(MailboxPoll(source=source_name, polled_at=now, fetched=fetched, error=error))
        for folder, mail_ids in moved.items():
            session.execute(
                update(InboundMail)
                .where(InboundMail.id.in_(mail_ids))
                .values(folder=folder, moved_at=now)
            )


@app.task(name=POLL_MAILBOX)
def poll_mailbox() -> dict[str, Any]:
    """Read the mailbox once; returns counts by kind (ids only, never contents)."""
    settings = get_settings()
    counts: dict[str, int] = {}
    calls_requested = False
    with poll_lock(settings) as held:
        if not held:
            return {"skipped": "another poll is running"}
        source = open_source(settings)
        fetched_in_all = 0
        moved: dict[str, list[int]] = {}
        try:
            with source:
                while fetched_in_all < settings.mailbox_batch:
                    batch = source.fetch_new(settings.mailbox_batch - fetched_in_all)
                    if not batch:
                        break
                    fetched_in_all += len(batch)
                    results: list[tuple[Fetched, apply.Applied]] = []
                    for start in range(0, len(batch), GROUP_SIZE):
                        group = batch[start : start + GROUP_SIZE]
                        results += zip(
                            group, apply_group(source.name, group, settings), strict=True
                        )
                    for fetched, applied in results:
                        folder = folder_for(applied.kind, applied.state)
                        try:
                            source.move(fetched.key, folder)
                        except StaleKeyError:
                            # The mailbox renumbered its messages: this one comes back under
                            # a new key, is found by its bytes and moved then.
                            counts["stale_key"] = counts.get("stale_key", 0) + 1
                            continue
                        moved.setdefault(folder, []).append(applied.mail_id)
                        label = applied.kind.value if applied.new else "seen_before"
                        counts[label] = counts.get(label, 0) + 1
                        calls_requested = calls_requested or applied.call_requested
            record_poll(source.name, fetched_in_all, None, moved)
        except MailboxError as exc:
            # One line, no contents: the next poll tries again.
            log.warning("mailbox poll failed: %s", exc)
            record_poll(source.name, fetched_in_all, str(exc)[:MAX_REASON], moved)
            counts["error"] = 1
    if calls_requested or calls_waiting():
        from comms_tasks.calls.tasks import schedule_calls

        schedule_calls.delay()
    return counts


def calls_waiting() -> bool:
    """Whether an email waits for a call that no run was started for.

    A bounce asks for its call in its own transaction; the poll that should then start
    ``comms.schedule_calls`` may die before its end (killed, the database gone), and the
    next poll finds the bounce seen before. Any poll starts the booking while an email
    still waits, so that such a call is booked now rather than at the next follow-up check.
    """
    from comms_tasks.calls.follow_up import waiting_for_call

    with transaction() as session:
        return bool(waiting_for_call(session, limit=1))


def apply_group(source_name: str, group: list[Fetched], settings: Settings) -> list[apply.Applied]:
    """Record a group of messages in one transaction; one by one when that fails."""
    try:
        return recording(
            source_name, [groups.read(fetched, settings) for fetched in group], settings
        )
    except Exception as exc:  # noqa: BLE001 - the group is rolled back and tried one by one
        if len(group) > 1:
            log.warning(
                "mailbox group of %d messages rolled back (%s); recording them one by one",
                len(group),
                type(exc).__name__,
            )
        return [apply_one(source_name, fetched, settings) for fetched in group]


def apply_one(source_name: str, fetched: Fetched, settings: Settings) -> apply.Applied:
    """Record one message; one that cannot be recorded is kept as unmatched, with why."""
    try:
        [applied] = recording(source_name, [groups.read(fetched, settings)], settings)
        return applied
    except OperationalError:
        raise  # the database is away: the message stays in the inbox for the next poll
    except Exception as exc:  # noqa: BLE001 - one message never stops a poll
        log.warning(
            "mailbox message %s could not be applied (%s); kept as unmatched",
            fetched.key,
            type(exc).__name__,
        )
        return keep_unreadable(source_name, fetched, f"could not be applied: {type(exc).__name__}")
