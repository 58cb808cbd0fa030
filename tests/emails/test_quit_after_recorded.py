"""A send run says QUIT only once every result it handed over is committed.

The connection is what bounds the duplicates after a SIGKILL: at most the one message
per open connection whose acceptance is not yet recorded. A run that closed its
connection at the end of a claim before the recorder committed the last result would
leave, in that window, an accepted and unrecorded message with no connection open.
Fault injection: the recorder's last commit is slowed, in this process (no worker
needed); the server reads the database when the QUIT arrives.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.emails import recording
from comms_tasks.emails.tasks import send_email
from comms_tasks.models import Email, EmailStatus
from tests import factories as f
from tests.conftest import count_rows
from tests.smtp import SmtpSink

EMAILS = 3


def test_the_connection_is_closed_after_the_last_result_is_committed(
    committed_db: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    f.queue_plain_emails(committed_db, EMAILS, "quit")
    with Session(committed_db) as session:
        last = max(session.scalars(select(Email.id)))
    real_record = recording.ResultRecorder._record

    def slow_record(self, statements, item):  # the last commit takes its time
        if item[0].email_id == last:
            time.sleep(0.5)
        return real_record(self, statements, item)

    sent_at_quit: list[int] = []
    real_quit = smtp._quit_received

    def quit_received() -> None:
        sent_at_quit.append(count_rows(committed_db, Email, Email.status == EmailStatus.SENT))
        real_quit()

    monkeypatch.setattr(recording.ResultRecorder, "_record", slow_record)
    monkeypatch.setattr(smtp, "_quit_received", quit_received)

    assert send_email() == {"sent": EMAILS}

    assert len(smtp.accepted) == EMAILS
    assert sent_at_quit == [EMAILS], "QUIT came before every accepted message was recorded"
