"""Defects found by attack on the poll's groups (stop 23: a group reads and locks at its
start); each test failed before its fix.

1. A group reads the unsent reminders of its emails once, at its start (lock_threads). A
   reminder that was ``sending`` then (claimed by a send run, so left to it) and that the send
   run gave back (``send_results.release``: its time budget ran out before it) is ``queued``
   again when the group comes to the reply to its original. The per-message lookup, made at
   the reply's turn, cancelled it; the group's snapshot does not, and the reminder goes out
   at the next send run to a therapist who answered.

2. A group locks its token and thread emails at its start, in id order; an email found by
   its sender alone is locked later, at its message's turn (Threads.lock_more), after the
   group already holds higher ids (and their calls and reminders). comms.schedule_calls
   locks the emails waiting for a call in id order: it gets the lower one, waits for the
   higher one the group holds, and the group then waits for the lower one: a deadlock.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.calls import follow_up
from comms_tasks.calls.tasks import schedule_calls
from comms_tasks.db import transaction
from comms_tasks.emails import delivery, send_results
from comms_tasks.emails.tasks import send_email
from comms_tasks.mailbox import tasks
from comms_tasks.mailbox.tasks import poll_mailbox
from comms_tasks.models import Email, EmailStatus
from comms_tasks.models.base import utcnow
from comms_tasks.settings import get_settings
from tests.emails.test_email_pipeline import all_emails, open_requests, run_batch, therapist
from tests.emails.test_send_rechecks import queue_command_email
from tests.mailbox.conftest import MaildirHarness
from tests.mailbox.samples import sample
from tests.mailbox.test_mailbox_hunt import in_another_transaction, in_background, until_waiting
from tests.mailbox.test_poll import ADDRESS, T0, load, mails, sent_email
from tests.smtp import SmtpSink

# --- 1. a reminder given back by a send run during the group ------------------------------


def test_a_reminder_given_back_during_the_group_is_cancelled_by_the_reply(
    inbox: MaildirHarness, committed_db: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    email = sent_email(committed_db, smtp)
    reminder = queue_command_email(email, "follow_up")
    claimed_at = utcnow()
    with transaction() as session:  # a send run claims the reminder
        claimed = delivery.prepare_batch(session, claimed_at, 1, get_settings(), reminder.id)
        assert [m.email_id for m in claimed] == [reminder.id]
    lease = delivery.lease_of_claim(claimed_at, get_settings())
    inbox.append(sample("thunderbird_reply.eml", email.reply_token or ""))
    recording = tasks.record
    released: list[bool] = []

    def give_back() -> None:
        with transaction() as session:
            send_results.release(session, [reminder.id], utcnow(), lease)
        released.append(True)

    def release_then_record(*args: Any, **kwargs: Any) -> Any:
        if not released:
            # The send run stops before the reminder's turn (time budget) and gives it
            # back: queued again (it waits for no lock of the poll).
            in_another_transaction(give_back)
        return recording(*args, **kwargs)

    monkeypatch.setattr(tasks, "record", release_then_record)

    assert poll_mailbox() == {"reply": 1}

    assert load(committed_db).response_received is True
    with Session(committed_db) as session:
        row = session.get(Email, reminder.id)
        assert row is not None
        assert row.status is EmailStatus.CANCELLED, (
            f"the reminder is {row.status.value} after the reply to its original was "
            "recorded: the next send run mails it to a therapist who answered"
        )


# --- 2. a sender-only match locked late: a deadlock with the booking ------------------------


def two_waiting_emails(committed_db: Engine) -> tuple[Email, Email]:
    """Therapist 7 (ADDRESS) gets the lower id, therapist 8 the higher; both sent 8 days
    ago, unanswered, and marked as waiting for their follow-up call."""
    therapist(7, email=ADDRESS, last_name="Beispiel", first_name="Anna")
    open_requests(7, range(70, 72))
    run_batch(T0)
    assert send_email() == {"sent": 1}
    therapist(8, email="b.zweite@praxis-zwei.example", last_name="Zweite", first_name="Berta")
    open_requests(8, range(80, 82))
    run_batch(T0)
    assert send_email() == {"sent": 1}
    with Session(committed_db) as session, session.begin():
        for row in session.scalars(select(Email)):
            row.sent_at = utcnow() - dt.timedelta(days=8)
    with transaction() as session:
        assert follow_up.request_follow_up_calls(session, utcnow(), get_settings()) == 2
    low, high = all_emails(committed_db)
    assert (low.therapist_id, high.therapist_id) == (7, 8)
    return low, high


def test_a_sender_match_in_a_group_and_the_booking_do_not_deadlock(
    inbox: MaildirHarness,
    committed_db: Engine,
    smtp: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    low, high = two_waiting_emails(committed_db)
    # 1: a reply to the higher email by its token; 2: a reply of therapist 7 (ADDRESS)
    # without token or thread headers of ours: found by its sender alone (the lower).
    inbox.append(sample("thunderbird_reply.eml", high.reply_token or ""))
    time.sleep(0.01)
    inbox.append(
        sample("thunderbird_reply.eml", "").replace(b"Message-ID: <", b"Message-ID: <second-")
    )
    recording = tasks.record
    errors: list[BaseException] = []
    booking: list[threading.Thread] = []

    def record_while_booking(*args: Any, **kwargs: Any) -> Any:
        if not booking:
            booking.append(in_background(schedule_calls, errors))
            assert until_waiting(booking[0], committed_db)
        return recording(*args, **kwargs)

    monkeypatch.setattr(tasks, "record", record_while_booking)

    with caplog.at_level("WARNING", logger="comms_tasks.mailbox.tasks"):
        poll_mailbox()
    booking[0].join(timeout=60)

    failures = [f"{type(e).__name__}: {str(e).splitlines()[0]}" for e in errors]
    assert not errors, f"the booking failed: {failures}"
    assert "rolled back" not in caplog.text, caplog.text
    by_token, by_sender = mails(committed_db)
    assert (by_token.email_id, by_token.match_method) == (high.id, "token")
    assert (by_sender.email_id, by_sender.match_method) == (low.id, "sender")
