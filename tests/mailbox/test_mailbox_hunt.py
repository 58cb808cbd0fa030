"""Probes of the mailbox stage by attack: what a stranger's mail, a second copy, a second
writer or the clock can do to it. Each test names the defect it showed; the Maildir
backend only (the IMAP one shares every line of the code under attack)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.mailbox import apply as mail_apply
from comms_tasks.mailbox import email_lookup, sources, tasks
from comms_tasks.mailbox.tasks import poll_mailbox
from comms_tasks.models import Email, EmailStatus, InboundMail, InboundMailKind, InboundMailState
from comms_tasks.models.base import utcnow
from comms_tasks.privacy.retention import purge_all_expired
from comms_tasks.settings import get_settings
from tests import factories as f
from tests.conftest import waiting_on_locks
from tests.emails.test_email_pipeline import apply, events_of
from tests.mailbox.conftest import MaildirHarness
from tests.mailbox.samples import sample
from tests.mailbox.test_poll import MISTYPED, load, mails, sent_email
from tests.smtp import SmtpSink

PATIENT = "comms.handle_patient_event"
# The first patient of the email sent_email() makes (requests 70 and 71).
PATIENT_ID = 10_070


def in_another_transaction(action: Callable[[], None]) -> None:
    """Run ``action`` to its commit on a thread (and connection) of its own."""
    errors: list[BaseException] = []
    thread = in_background(action, errors)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the other transaction waited for a lock of the poll"
    assert not errors, errors


def in_background(action: Callable[[], object], errors: list[BaseException]) -> threading.Thread:
    """``action`` started on a thread (and connection) of its own; what it raises goes to
    ``errors``, handed to the test."""

    def run() -> None:
        try:
            action()
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def until_waiting(thread: threading.Thread, engine: Engine, seconds: float = 10) -> bool:
    """Whether ``thread`` came to wait for a lock (or ended) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while thread.is_alive() and not waiting_on_locks(engine):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def erase_right_after_matching(
    monkeypatch: pytest.MonkeyPatch, engine: Engine, errors: list[BaseException]
) -> list[threading.Thread]:
    """patient.erased starts just after the poll found its group's emails, before it locks
    and applies them: the interleaving of two workers at the wrong moment. The erasure
    runs on a thread (and connection) of its own; the poll goes on once the erasure waits
    for a lock of the poll (or has committed). The caller joins the thread."""
    finding = email_lookup.find_emails
    started: list[threading.Thread] = []

    def find_then_erase(*args: Any, **kwargs: Any) -> Any:
        found = finding(*args, **kwargs)
        if found.emails() and not started:
            started.append(
                in_background(
                    lambda: apply(PATIENT, f.patient_erased(PATIENT_ID, occurred_at=utcnow())),
                    errors,
                )
            )
            assert until_waiting(started[0], engine), "the erasure neither waited nor ended"
        return found

    monkeypatch.setattr(email_lookup, "find_emails", find_then_erase)
    return started


# --- a second copy of one message ---------------------------------------------------------


def test_a_reply_delivered_twice_is_recorded_once(
    inbox: MaildirHarness, committed_db: Engine, smtp: SmtpSink
) -> None:
    """Reply-all to our sender and our tagged Reply-To on one mailbox: the MTA delivers
    one copy per recipient address, each with its own Delivered-To line on top."""
    email = sent_email(committed_db, smtp)
    reply = sample("thunderbird_reply.eml", email.reply_token or "")
    inbox.append(reply)
    inbox.append(b"Delivered-To: antwort@praxis-service.example\r\n" + reply)

    poll_mailbox()

    assert len(events_of(committed_db, "email.response_recorded")) == 1
    assert inbox.subjects() == []
    first, second = mails(committed_db)
    assert (first.email_id, second.email_id) == (email.id, email.id)
    assert second.state is InboundMailState.MATCHED and second.raw is not None
    assert second.review_reason == f"another copy of message {first.id}: not applied"


# --- two writers: a reply and patient.erased ----------------------------------------------


@pytest.mark.parametrize("name", ["thunderbird_reply.eml", "exchange_ooo.eml"])
def test_mail_applied_while_its_patient_is_erased_keeps_nothing_of_it(
    inbox: MaildirHarness,
    committed_db: Engine,
    smtp: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
) -> None:
    email = sent_email(committed_db, smtp)
    inbox.append(sample(name, email.reply_token or ""))
    errors: list[BaseException] = []
    erasure = erase_right_after_matching(monkeypatch, committed_db, errors)

    poll_mailbox()
    erasure[0].join(timeout=30)

    assert not erasure[0].is_alive() and not errors, errors
    [mail] = mails(committed_db)
    assert mail.email_id == email.id
    assert (mail.raw, mail.reply_text, mail.subject) == (None, None, None)
    assert load(committed_db).response_content is None


# --- retention ------------------------------------------------------------------------------


def test_retention_redacts_the_returned_body_of_a_bounce_with_its_email(
    inbox: MaildirHarness, committed_db: Engine, smtp: SmtpSink
) -> None:
    """A bounce returns our email (the patients' summaries) and moves no clock of the
    email: when retention redacts the email, the copy in the bounce goes too."""
    email = sent_email(committed_db, smtp, address=MISTYPED)
    # Postfix gives up after 5 days: the bounce came 5 days after the email.
    inbox.append(sample("postfix_bounce.eml", email.reply_token or ""))
    assert poll_mailbox() == {"bounce": 1}
    now = utcnow()
    with Session(committed_db) as session, session.begin():
        sent = session.get(Email, email.id)
        assert sent is not None
        sent.last_activity_at = now - dt.timedelta(days=181)
        [bounce] = session.scalars(select(InboundMail)).all()
        bounce.fetched_at = now - dt.timedelta(days=176)

    counts = purge_all_expired(now, 180)

    assert counts["redacted"] == 1
    assert load(committed_db).body_redacted_at is not None
    [bounce] = mails(committed_db)
    assert (bounce.kind, bounce.state) == (InboundMailKind.BOUNCE, InboundMailState.MATCHED)
    assert bounce.raw is None and bounce.redacted_at is not None


# --- two polls at once, a message that raises -------------------------------------------


def test_two_polls_at_once_on_postgresql_apply_each_message_once(
    inbox: MaildirHarness, committed_db: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second poll starts (its own connection, its own thread) while the first is in
    the middle of a message: it returns at once, and the message is applied once."""
    email = sent_email(committed_db, smtp)
    inbox.append(sample("thunderbird_reply.eml", email.reply_token or ""))
    inbox.append(sample("exchange_ooo.eml", email.reply_token or ""))
    applying = tasks.record
    second: list[dict[str, Any]] = []

    def apply_while_another_polls(*args: Any, **kwargs: Any) -> Any:
        if not second:
            in_another_transaction(lambda: second.append(poll_mailbox()))
        return applying(*args, **kwargs)

    monkeypatch.setattr(tasks, "record", apply_while_another_polls)

    assert poll_mailbox() == {"reply": 1, "auto_reply": 1}

    assert second == [{"skipped": "another poll is running"}]
    assert len(mails(committed_db)) == 2
    assert len(events_of(committed_db, "email.response_recorded")) == 1


def test_a_message_that_raises_while_applied_is_kept_with_its_reason_and_moved(
    inbox: MaildirHarness,
    committed_db: Engine,
    smtp: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    email = sent_email(committed_db, smtp)
    inbox.append(sample("thunderbird_reply.eml", email.reply_token or ""))
    inbox.append(sample("exchange_ooo.eml", email.reply_token or ""))

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Frau Muster, Diagnose F32.1")  # a message's text in an error

    monkeypatch.setattr(mail_apply, "record_reply", broken)

    assert poll_mailbox() == {"unrelated": 1, "auto_reply": 1}
    assert poll_mailbox() == {}

    reply, ooo = mails(committed_db)
    assert (reply.state, reply.defect) == (
        InboundMailState.UNMATCHED,
        "could not be applied: RuntimeError",
    )
    assert reply.raw is not None
    assert ooo.state is InboundMailState.MATCHED
    assert inbox.subjects() == []
    assert len(inbox.subjects("Unmatched")) == 1
    assert load(committed_db).response_received is False
    assert "Muster" not in caplog.text and "Beispiel" not in caplog.text


def test_the_same_bytes_twice_in_one_group_are_applied_once_without_a_rollback(
    inbox: MaildirHarness,
    committed_db: Engine,
    smtp: SmtpSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two files with the same bytes in one poll: the group records the first and finds
    the second by its hash (not by a unique violation that would roll the group back)."""
    email = sent_email(committed_db, smtp)
    reply = sample("thunderbird_reply.eml", email.reply_token or "")
    inbox.append(reply)
    inbox.append(sample("exchange_ooo.eml", email.reply_token or ""))
    inbox.append(reply)

    with caplog.at_level("WARNING", logger="comms_tasks.mailbox.tasks"):
        assert poll_mailbox() == {"reply": 1, "auto_reply": 1, "seen_before": 1}

    assert "rolled back" not in caplog.text
    assert len(mails(committed_db)) == 2
    assert len(events_of(committed_db, "email.response_recorded")) == 1
    assert inbox.subjects() == []


# --- a poll killed after a bounce's commit ------------------------------------------------


def test_a_bounce_whose_poll_died_after_its_commit_still_gets_its_call_booked(
    inbox: MaildirHarness, committed_db: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bounce's transaction asked for the call now; the poll that should start
    comms.schedule_calls died before its end. The next poll finds the bounce seen before:
    the call must still be booked now, not at tomorrow's follow-up check."""
    from comms_tasks.calls.tasks import schedule_calls

    email = sent_email(committed_db, smtp, address=MISTYPED)
    inbox.append(sample("postfix_bounce.eml", email.reply_token or ""))
    started: list[bool] = []
    monkeypatch.setattr(schedule_calls, "delay", lambda *a, **k: started.append(True))
    source_class = type(sources.open_source(get_settings()))
    moving = source_class.move

    def crash(self: Any, key: str, folder: str) -> None:
        raise KeyboardInterrupt("the worker died here")

    monkeypatch.setattr(source_class, "move", crash)
    with pytest.raises(KeyboardInterrupt):
        poll_mailbox()
    monkeypatch.setattr(source_class, "move", moving)
    assert load(committed_db).call_requested_at is not None
    assert started == []

    assert poll_mailbox() == {"seen_before": 1}

    assert started == [True]


# --- two clocks: when the therapist wrote, and when we learned of it --------------------


def test_a_reply_read_after_its_reminder_was_queued_cancels_the_unsent_reminder(
    inbox: MaildirHarness, committed_db: Engine, smtp: SmtpSink
) -> None:
    """The reply was written (its Date) before the reminder was queued, and read from the
    mailbox after: the reminder was asked for without knowing of the answer, and must
    not go out to a therapist who answered."""
    from tests.emails.test_send_rechecks import queue_command_email

    email = sent_email(committed_db, smtp)
    reminder = queue_command_email(email, "follow_up")  # queued now, not yet sent
    written = (utcnow() - dt.timedelta(hours=1)).astimezone(dt.timezone(dt.timedelta(hours=1)))
    raw = sample("thunderbird_reply.eml", email.reply_token or "").replace(
        b"Date: Mon, 2 Mar 2026 09:12:41 +0100",
        f"Date: {written:%a, %d %b %Y %H:%M:%S %z}".encode(),
    )
    inbox.append(raw)

    assert poll_mailbox() == {"reply": 1}

    assert load(committed_db).response_received is True
    with Session(committed_db) as session:
        unsent = session.get(Email, reminder.id)
        assert unsent is not None
        assert unsent.status is EmailStatus.CANCELLED, unsent.status


# --- erasure of mail that matched nothing -------------------------------------------------


def test_an_unmatched_reply_quoting_the_email_is_redacted_by_the_erasure(
    inbox: MaildirHarness, committed_db: Engine, smtp: SmtpSink
) -> None:
    """Answered from a private address in a new message (no token, no thread headers),
    quoting the whole email: nothing matches it, and it holds the patient's summary."""
    sent_email(committed_db, smtp)
    raw = b"\n".join(
        line
        for line in sample("gmail_reply.eml", "").replace(b"antwort+@", b"antwort@").split(b"\n")
        if not line.lower().startswith((b"in-reply-to:", b"references:"))
    )
    inbox.append(raw)
    poll_mailbox()
    [kept] = mails(committed_db)
    assert (kept.state, kept.email_id) == (InboundMailState.UNMATCHED, None)
    assert kept.raw is not None

    apply(PATIENT, f.patient_erased(PATIENT_ID, occurred_at=utcnow()))

    [after] = mails(committed_db)
    assert after.raw is None
