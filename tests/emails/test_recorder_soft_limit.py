"""A soft time limit while the recorder's last commit is under way loses nothing.

``ResultRecorder`` waits, however its block ends, until every result handed over is
committed. Here the soft time limit (raised as billiard raises it, from a timer signal in
the main thread) strikes while the last result's commit is slowed down: before the fix
the block was left at once, send_email released the accepted message to ``queued`` while
the recorder thread still ran, and it was sent again. Fault injection: the recorder's
commit is slowed and the limit's signal timed, in this process (no worker needed).
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from billiard.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.emails import recording
from comms_tasks.emails.tasks import send_email
from comms_tasks.models import Email, EmailStatus
from tests import factories as f
from tests.smtp import SmtpSink


def test_soft_limit_during_the_final_join(
    committed_db: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    f.queue_plain_emails(committed_db, 2, "join")
    with Session(committed_db) as session:
        # Not 1 and 2: a rolled-back test before this one moved the id sequence on.
        first, last = session.scalars(select(Email.id).order_by(Email.id)).all()
    real_record = recording.ResultRecorder._record
    real_add = recording.ResultRecorder.add

    def slow_record(self, session, item):  # the connection checkout / round trips of the last one
        if item[0].email_id == last:
            time.sleep(1.0)
        return real_record(self, session, item)

    def add(self, result):
        real_add(self, result)
        if result.email_id == last:
            signal.setitimer(signal.ITIMER_REAL, 0.3)  # the soft limit, as billiard raises it

    def soft_limit(*_: object) -> None:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(recording.ResultRecorder, "_record", slow_record)
    monkeypatch.setattr(recording.ResultRecorder, "add", add)
    previous = signal.signal(signal.SIGALRM, soft_limit)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            send_email()
        # enumerate(), not is_alive(): an interrupted join marks the thread stopped
        # (CPython bpo-45274) although it is still running.
        alive = [t.name for t in threading.enumerate() if t.name == "send-results"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    time.sleep(2)  # the late recorder has run by now
    with Session(committed_db) as session:
        statuses = {e.id: e.status for e in session.scalars(select(Email))}
    assert len(smtp.accepted) == 2
    assert alive == [], "send_email raised while its recorder thread was still recording"
    assert statuses == {first: EmailStatus.SENT, last: EmailStatus.SENT}, (
        f"both accepted by the server, but {statuses}"
    )
