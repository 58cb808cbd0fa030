"""A worker killed with SIGKILL mid-send: no email is lost, duplicates stay bounded.

500 queued emails are drained by two real workers over SMTP. Once the server accepted some
of them, worker 1 (its main process and its pool children) is killed with SIGKILL. A
replacement worker starts; ``comms.send_email`` is sent every few seconds, as the beat
would. The emails worker 1 had claimed stay ``sending`` until their lease runs out (task
time limit + 60 s), and are then claimed again. Every email ends ``sent``; a message may
reach the server twice only if it was in flight (``sending``) at the moment of the kill.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from comms_tasks.models import Email, EmailStatus
from tests import factories as f
from tests.conftest import (
    REDIS_URL,
    WorkerProcess,
    broker_environment,
    count_rows,
    start_workers,
    wait_for,
)
from tests.smtp import SmtpSink

EMAILS = 500
KILL_AFTER_ACCEPTED = 50
BROKER_URL = REDIS_URL.rsplit("/", 1)[0] + "/6"
# Short limits so that the lease (time limit + LEASE_MARGIN of 60 s) runs out in the test.
TASK_TIME_LIMIT = 20
TASK_SOFT_TIME_LIMIT = 15
# Each accepted message holds the server a little, so the kill comes while sending.
ACCEPT_DELAY_SECONDS = 0.02
RESEND_INTERVAL_SECONDS = 3
RECOVERY_TIMEOUT = 240


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    server = SmtpSink(accept_delay=ACCEPT_DELAY_SECONDS)
    server.start()
    yield server
    server.stop()


def count_status(engine: Engine, status: EmailStatus) -> int:
    return count_rows(engine, Email, Email.status == status)


def status_counts(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        rows = session.execute(select(Email.status, func.count()).group_by(Email.status))
        return {str(status.value): int(n) for status, n in rows}


def children_of(pid: int) -> list[int]:
    result = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False, timeout=10
    )
    return [int(line) for line in result.stdout.split()]


def kill_worker(worker: WorkerProcess) -> None:
    """SIGKILL the worker's main process and its pool children, children first."""
    pid = worker.process.pid
    for child in children_of(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    worker.process.wait(timeout=30)


@pytest.mark.reliability
def test_worker_killed_mid_send_loses_no_email(
    committed_db: Engine, committed_url: str, sink: SmtpSink, tmp_path: Path
) -> None:
    f.queue_plain_emails(committed_db, EMAILS, "kill")
    env = broker_environment(
        committed_url,
        BROKER_URL,
        tmp_path / "var",
        **sink.worker_settings(),
        COMMS_TASK_TIME_LIMIT=str(TASK_TIME_LIMIT),
        COMMS_TASK_SOFT_TIME_LIMIT=str(TASK_SOFT_TIME_LIMIT),
    )
    workers = start_workers(env, tmp_path)
    app = Celery("operator", broker=BROKER_URL, set_as_current=False)
    try:
        for _ in range(4):
            app.send_task("comms.send_email")
        wait_for(
            lambda: len(sink.accepted) >= KILL_AFTER_ACCEPTED,
            timeout=60,
            interval=0.02,
            explain=workers[0].tail,
        )
        kill_worker(workers[0])
        killed_at = time.monotonic()
        in_flight_at_kill = count_status(committed_db, EmailStatus.SENDING)
        accepted_at_kill = len(sink.accepted)
        assert accepted_at_kill < EMAILS, "the kill came after every email was sent"

        workers.append(
            WorkerProcess(env, tmp_path / "worker3.log", "--hostname=w3@%h"),
        )
        last_send = 0.0

        def all_sent() -> bool:
            nonlocal last_send
            if time.monotonic() - last_send >= RESEND_INTERVAL_SECONDS:
                app.send_task("comms.send_email")
                last_send = time.monotonic()
            return count_status(committed_db, EmailStatus.SENT) == EMAILS

        wait_for(
            all_sent,
            timeout=RECOVERY_TIMEOUT,
            interval=0.5,
            explain=lambda: f"statuses: {status_counts(committed_db)}\n{workers[-1].tail()}",
        )
        recovery_seconds = time.monotonic() - killed_at
    finally:
        for worker in workers:
            worker.stop()
        app.close()

    assert status_counts(committed_db) == {EmailStatus.SENT.value: EMAILS}
    counts = sink.message_ids()
    assert len(counts) == EMAILS, "every email reached the server"
    duplicates = sum(1 for seen in counts.values() if seen > 1)
    assert max(counts.values()) <= 2
    assert duplicates <= in_flight_at_kill
    print(
        f"\nRELIABILITY worker_killed: emails={EMAILS} duplicates={duplicates} "
        f"in_flight_at_kill={in_flight_at_kill} recovery_seconds={recovery_seconds:.1f}"
    )
