"""Two real workers drain 500 queued emails at once: each reaches the server exactly once."""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from sqlalchemy import Engine

from comms_tasks.models import Email, EmailStatus
from tests import factories as f
from tests.conftest import broker_environment, count_rows, start_workers, wait_for
from tests.smtp import SmtpSink

EMAILS = 500
# A Redis database of its own: the session's worker (file backend) must not take these.
BROKER_SLOT = 14  # the broker_url fixture: this module's broker, on each kind


def test_two_workers_send_each_email_exactly_once(
    broker_url: str, committed_db: Engine, committed_url: str, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    f.queue_plain_emails(committed_db, EMAILS, "load")
    env = broker_environment(
        committed_url,
        broker_url,
        tmp_path / "var",
        **smtp_sink.worker_settings(),
    )
    workers = start_workers(env, tmp_path)
    app = Celery("operator", broker=broker_url, set_as_current=False)
    try:
        for _ in range(6):
            app.send_task("comms.send_email")

        def all_sent() -> bool:
            return count_rows(committed_db, Email, Email.status == EmailStatus.SENT) == EMAILS

        wait_for(all_sent, timeout=120, interval=0.5)
    finally:
        for worker in workers:
            worker.stop()
        app.close()
    counts = smtp_sink.message_ids()
    assert len(counts) == EMAILS
    assert set(counts.values()) == {1}
    logs = [worker.log() for worker in workers]
    assert all("comms.send_email" in log and " sent=" in log for log in logs), (
        "both workers should have sent a share"
    )
