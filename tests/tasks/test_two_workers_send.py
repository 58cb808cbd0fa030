"""Two real workers drain 500 queued emails at once: each reaches the server exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from comms_tasks.models import Email, EmailStatus
from tests import factories as f
from tests.conftest import REDIS_URL, WorkerProcess, broker_environment, wait_for
from tests.smtp import SmtpSink

EMAILS = 500
# A Redis database of its own: the session's worker (file backend) must not take these.
BROKER_URL = REDIS_URL.rsplit("/", 1)[0] + "/14"


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    server = SmtpSink()
    server.start()
    yield server
    server.stop()


def test_two_workers_send_each_email_exactly_once(
    committed_db: Engine, committed_url: str, sink: SmtpSink, tmp_path: Path
) -> None:
    f.queue_plain_emails(committed_db, EMAILS, "load")
    env = broker_environment(
        committed_url,
        BROKER_URL,
        tmp_path / "var",
        **sink.worker_settings(),
    )
    workers = [
        WorkerProcess(env, tmp_path / f"worker{n}.log", f"--hostname=w{n}@%h") for n in (1, 2)
    ]
    app = Celery("operator", broker=BROKER_URL, set_as_current=False)
    try:
        for _ in range(6):
            app.send_task("comms.send_email")

        def all_sent() -> bool:
            with Session(committed_db) as session:
                sent = session.scalar(
                    select(func.count()).select_from(Email).where(Email.status == EmailStatus.SENT)
                )
            return sent == EMAILS

        wait_for(all_sent, timeout=120, interval=0.5)
    finally:
        for worker in workers:
            worker.stop()
        app.close()
    counts = sink.message_ids()
    assert len(counts) == EMAILS
    assert set(counts.values()) == {1}
    logs = [worker.log() for worker in workers]
    assert all("comms.send_email" in log and " sent=" in log for log in logs), (
        "both workers should have sent a share"
    )
