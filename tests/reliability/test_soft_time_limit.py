"""A send run stopped by its soft time limit mid-claim: what went out is recorded, the rest
is queued again at once.

One real worker with a 2 s soft time limit claims 100 queued emails; the SMTP server
accepts the first message at once and holds each next one 3 s before its reply. The run
hands a message over only while its time budget (80 % of the limit, 1.6 s) lasts: the
second message goes right after the first (the run may take up to 1.6 s to get there, a
loaded machine's start), and the limit strikes while its reply is on its way. The results
already handed to the recorder are committed, the emails not sent go back to ``queued``
(not left ``sending`` until their lease, here 90 s, runs out), and every message the
server accepted is marked ``sent`` but the one whose reply the limit cut off.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.models import Email, EmailStatus
from tests import factories as f
from tests.conftest import WorkerProcess, broker_environment, count_rows
from tests.smtp import SmtpSink

pytestmark = pytest.mark.reliability

EMAILS = 100  # one claim
BROKER_SLOT = 15  # the broker_url fixture: this module's broker, on each kind
SOFT_TIME_LIMIT = 2
TIME_LIMIT = 30  # the lease is this plus a minute: far beyond the test's wait
# The first message at once, every next one held beyond the soft limit.
ACCEPT_DELAYS = (0.0, 3.0)
# The release must come well before any lease could run out.
SETTLE_TIMEOUT = 20


@pytest.fixture
def slow_sink() -> Iterator[SmtpSink]:
    server = SmtpSink(accept_delay=ACCEPT_DELAYS)
    server.start()
    yield server
    server.stop()


def test_soft_time_limit_records_what_was_sent_and_queues_the_rest_at_once(
    broker_url: str, committed_db: Engine, committed_url: str, slow_sink: SmtpSink, tmp_path: Path
) -> None:
    f.queue_plain_emails(committed_db, EMAILS, "soft-limit")
    env = broker_environment(
        committed_url,
        broker_url,
        tmp_path / "var",
        **slow_sink.worker_settings(),
        COMMS_TASK_SOFT_TIME_LIMIT=str(SOFT_TIME_LIMIT),
        COMMS_TASK_TIME_LIMIT=str(TIME_LIMIT),
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    app = Celery("operator", broker=broker_url, set_as_current=False)
    try:
        started = time.monotonic()
        app.send_task("comms.send_email")

        def settled() -> bool:
            # Claimed emails are `sending` until recorded or released.
            return (
                count_rows(committed_db, Email, Email.status == EmailStatus.SENT) > 0
                and count_rows(committed_db, Email, Email.status == EmailStatus.SENDING) == 0
            )

        worker.wait_for(settled, timeout=SETTLE_TIMEOUT)
        settled_after = time.monotonic() - started
        worker.wait_for(lambda: "SoftTimeLimitExceeded" in worker.log())
    finally:
        worker.stop()
        app.close()

    with Session(committed_db) as session:
        status_of = {
            message_id: status
            for message_id, status in session.execute(select(Email.message_id, Email.status))
        }
    sent = {message_id for message_id, status in status_of.items() if status is EmailStatus.SENT}
    queued = {
        message_id for message_id, status in status_of.items() if status is EmailStatus.QUEUED
    }
    assert sent | queued == set(status_of), "every email is sent or queued again"
    assert queued, "the limit struck before the claim was through"
    accepted = set(slow_sink.message_ids())
    assert sent <= accepted
    # The one message in flight when the limit struck may be accepted but not recorded.
    assert len(accepted - sent) <= 1, accepted - sent
    print(
        f"RELIABILITY soft_time_limit: claimed={EMAILS} sent={len(sent)} "
        f"queued_again={len(queued)} accepted_unrecorded={len(accepted - sent)} "
        f"settled_after={settled_after:.1f}s"
    )
