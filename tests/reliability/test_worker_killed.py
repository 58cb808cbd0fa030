"""Workers killed with SIGKILL mid-send: no email is lost, one duplicate per open connection.

800 queued emails are drained by real workers over SMTP. Three times, once the server
accepted 30, 120 and 250 messages, the worker with the most SMTP connections open is
stopped (SIGSTOP, main process and pool children), its connections to the server are
counted, and it is killed with SIGKILL; a replacement starts. ``comms.send_email`` is sent
every few seconds, as the beat would. The emails a killed worker had claimed stay
``sending`` until their lease runs out (task time limit + 60 s), and are then claimed
again. Every email ends ``sent``. A message reaches the server twice only if the server
accepted it and its result was not yet committed: at most one per connection the killed
worker had open, counted by Message-ID at the server.
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
    WorkerProcess,
    broker_environment,
    count_rows,
    start_workers,
    wait_for,
)
from tests.smtp import SmtpSink

EMAILS = 800
# Messages accepted by the server before each kill: early, in the middle, late.
KILL_AFTER_ACCEPTED = (30, 120, 250)
SEND_RUNS_PER_WORKER = 2  # a worker's pool processes (--concurrency=2)
BROKER_SLOT = 6  # the broker_url fixture: this module's broker, on each kind
# Short limits so that the lease (time limit + LEASE_MARGIN of 60 s) runs out in the test.
TASK_TIME_LIMIT = 20
TASK_SOFT_TIME_LIMIT = 15
# Each accepted message holds the server a little, so the kills come while sending.
ACCEPT_DELAY_SECONDS = 0.05
RESEND_INTERVAL_SECONDS = 3
RECOVERY_TIMEOUT = 240
TCP_ESTABLISHED = "01"


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


def processes_of(worker: WorkerProcess) -> list[int]:
    """The worker's pool children, then its main process."""
    return [*children_of(worker.process.pid), worker.process.pid]


def connections_to(port: int, pids: list[int]) -> int:
    """Established TCP connections from the processes ``pids`` to 127.0.0.1:``port``."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(FileNotFoundError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[len("socket:[") : -1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == port and fields[3] == TCP_ESTABLISHED and fields[9] in inodes:
            count += 1
    return count


def kill_worker(worker: WorkerProcess, smtp_port: int) -> int:
    """Freeze the worker (children first), count its SMTP connections, SIGKILL it.

    Returns the connections it had open at the kill.
    """
    pids = processes_of(worker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    connections = connections_to(smtp_port, pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    worker.process.wait(timeout=30)
    return connections


@pytest.mark.reliability
def test_workers_killed_mid_send_lose_no_email_and_resend_one_per_connection(
    broker_url: str, committed_db: Engine, committed_url: str, sink: SmtpSink, tmp_path: Path
) -> None:
    f.queue_plain_emails(committed_db, EMAILS, "kill")
    env = broker_environment(
        committed_url,
        broker_url,
        tmp_path / "var",
        **sink.worker_settings(),
        COMMS_TASK_TIME_LIMIT=str(TASK_TIME_LIMIT),
        COMMS_TASK_SOFT_TIME_LIMIT=str(TASK_SOFT_TIME_LIMIT),
    )
    workers = start_workers(env, tmp_path)
    live = list(workers)
    app = Celery("operator", broker=broker_url, set_as_current=False)
    kills: list[tuple[int, int]] = []  # (accepted at the kill, connections open)
    try:
        for _ in range(len(live) * SEND_RUNS_PER_WORKER):
            app.send_task("comms.send_email")
        for n, threshold in enumerate(KILL_AFTER_ACCEPTED, start=1):
            wait_for(
                lambda threshold=threshold: len(sink.accepted) >= threshold,  # type: ignore[misc]
                timeout=60,
                interval=0.01,
                explain=lambda: "\n".join(worker.tail() for worker in live),
            )
            victim = max(live, key=lambda worker: connections_to(sink.port, processes_of(worker)))
            connections = kill_worker(victim, sink.port)
            kills.append((len(sink.accepted), connections))
            assert connections <= SEND_RUNS_PER_WORKER
            live.remove(victim)
            replacement = WorkerProcess(env, tmp_path / f"worker-r{n}.log", f"--hostname=r{n}@%h")
            workers.append(replacement)
            live.append(replacement)
            for _ in range(SEND_RUNS_PER_WORKER):
                app.send_task("comms.send_email")
        killed_at = time.monotonic()
        assert len(sink.accepted) < EMAILS, "the kills came after every email was sent"
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
            explain=lambda: f"statuses: {status_counts(committed_db)}\n{live[-1].tail()}",
        )
        recovery_seconds = time.monotonic() - killed_at
    finally:
        for worker in workers:
            worker.stop()
        app.close()

    assert status_counts(committed_db) == {EmailStatus.SENT.value: EMAILS}
    counts = sink.message_ids()
    assert len(counts) == EMAILS, "every email reached the server"
    duplicates = sum(seen - 1 for seen in counts.values())
    open_at_kills = sum(connections for _, connections in kills)
    print(
        f"\nRELIABILITY worker_killed: emails={EMAILS} kills={len(kills)} "
        f"accepted_at_kills={[accepted for accepted, _ in kills]} "
        f"connections_open_at_kills={[connections for _, connections in kills]} "
        f"duplicates={duplicates} bound={open_at_kills} "
        f"recovery_seconds={recovery_seconds:.1f}"
    )
    assert duplicates <= open_at_kills, (
        f"{duplicates} messages reached the server twice; at most one per connection open "
        f"at a kill ({open_at_kills}) may"
    )
