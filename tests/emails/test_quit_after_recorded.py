"""A send run says QUIT only once every result it handed over is committed.

The connection is what bounds the duplicates after a SIGKILL: at most the one message
per open connection whose acceptance is not yet recorded. A run that closed its
connection at the end of a claim before the recorder committed the last result would
leave, in that window, an accepted and unrecorded message with no connection open.
Fault injection: the recorder's last commit is slowed, in this process (no worker
needed); the server reads the database when the QUIT arrives.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.emails import recording
from comms_tasks.emails.tasks import send_email
from comms_tasks.mail import sender as sender_module
from comms_tasks.models import Email, EmailStatus
from tests import factories as f
from tests.conftest import count_rows
from tests.smtp import SmtpSink

EMAILS = 3


def email_ids(engine: Engine) -> list[int]:
    with Session(engine) as session:
        return sorted(session.scalars(select(Email.id)))


def record_slowly(
    monkeypatch: pytest.MonkeyPatch, email_id: int, before: Callable[[], None] | None = None
) -> None:
    """The recorder's commit of ``email_id`` takes half a second (after ``before``)."""
    real_record = recording.ResultRecorder._record

    def slow_record(self, statements, item):
        if item[0].email_id == email_id:
            if before is not None:
                before()
            time.sleep(0.5)
        return real_record(self, statements, item)

    monkeypatch.setattr(recording.ResultRecorder, "_record", slow_record)


def record_failing(monkeypatch: pytest.MonkeyPatch, email_id: int) -> None:
    real_record = recording.ResultRecorder._record

    def record(self, statements, item):
        if item[0].email_id == email_id:
            raise RuntimeError("database went away")
        return real_record(self, statements, item)

    monkeypatch.setattr(recording.ResultRecorder, "_record", record)


def sent_at_each_quit(engine: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The emails recorded as sent, read by the server as each QUIT arrives."""
    seen: list[int] = []
    real_quit = smtp._quit_received

    def quit_received() -> None:
        seen.append(count_rows(engine, Email, Email.status == EmailStatus.SENT))
        real_quit()

    monkeypatch.setattr(smtp, "_quit_received", quit_received)
    return seen


def test_the_connection_is_closed_after_the_last_result_is_committed(
    committed_db: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    f.queue_plain_emails(committed_db, EMAILS, "quit")
    record_slowly(monkeypatch, email_ids(committed_db)[-1])
    sent_at_quit = sent_at_each_quit(committed_db, smtp, monkeypatch)

    assert send_email() == {"sent": EMAILS}

    assert len(smtp.accepted) == EMAILS
    assert sent_at_quit == [EMAILS], "QUIT came before every accepted message was recorded"


def test_the_soft_time_limit_during_that_wait_still_waits_for_the_last_result(
    committed_db: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    f.queue_plain_emails(committed_db, EMAILS, "quit-limit")
    last = email_ids(committed_db)[-1]
    main = threading.main_thread().ident
    assert main is not None
    settling = threading.Event()
    real_settle = recording.ResultRecorder.settle

    def settle(self):
        settling.set()
        return real_settle(self)

    def soft_limit_strikes() -> None:  # in the recorder thread, at the last result
        assert settling.wait(5)
        time.sleep(0.05)
        signal.pthread_kill(main, signal.SIGUSR1)

    def soft_limit(*_: object) -> None:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(recording.ResultRecorder, "settle", settle)
    record_slowly(monkeypatch, last, before=soft_limit_strikes)
    sent_at_quit = sent_at_each_quit(committed_db, smtp, monkeypatch)
    previous = signal.signal(signal.SIGUSR1, soft_limit)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            send_email()
    finally:
        signal.signal(signal.SIGUSR1, previous)

    assert count_rows(committed_db, Email, Email.status == EmailStatus.SENT) == EMAILS
    assert sent_at_quit == [EMAILS], "QUIT came before every accepted message was recorded"


def test_a_failed_recording_does_not_hide_the_soft_time_limit_on_its_way_out(
    committed_db: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    f.queue_plain_emails(committed_db, EMAILS, "quit-failed")
    ids = email_ids(committed_db)
    record_failing(monkeypatch, ids[1])
    real_build = sender_module.build_mime

    def build_mime(message):  # the soft limit strikes while the third is built
        if message.email_id == ids[2]:
            raise SoftTimeLimitExceeded()
        return real_build(message)

    monkeypatch.setattr(sender_module, "build_mime", build_mime)

    with pytest.raises(SoftTimeLimitExceeded):
        send_email()
    # The third never went out: queued again at once, not left to its lease.
    with Session(committed_db) as session:
        third = session.get(Email, ids[2])
        assert third is not None and third.status is EmailStatus.QUEUED


def test_a_run_ended_by_a_failed_recording_closes_its_connection_quietly(
    committed_db: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    f.queue_plain_emails(committed_db, EMAILS, "quit-quiet")
    ids = email_ids(committed_db)
    record_failing(monkeypatch, ids[0])
    real_add = recording.ResultRecorder.add

    def add(self, result):  # the first result's failure known before the second is added
        self._results.join()
        return real_add(self, result)

    monkeypatch.setattr(recording.ResultRecorder, "add", add)
    unraisable: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(repr(u.exc_value)))
    # Refused at RCPT: the second gets a result without waiting at its hand-over.
    smtp.refuse_recipient("praxis2@example.org")

    with pytest.raises(recording.RecordingFailedError):
        send_email()
    assert unraisable == []
