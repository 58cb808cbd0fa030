"""RabbitMQ stopped and started again under a running worker: nothing accepted is lost.

The node is a private one (``PrivateRabbitMQ``: its own node name, ports and data under a
temporary folder, never the machine's ``rabbit@localhost``). Unlike the private Redis, it
keeps its data over a restart: the task queue is a quorum queue and messages are
persistent, so every message the broker confirmed before the stop must be applied, once,
after it, including those a worker process had taken but not yet acknowledged.

Another service sends without pause, with publisher confirms: a ``send_task`` that
returned is a message the broker accepted; the one in flight at the stop may or may not
have been taken, and is applied at most once either way. Outbox events recorded while the
node is down are relayed after the restart to a durable queue bound to ``comms.events``
before the stop.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.models import (
    DeadLetter,
    OutboxEvent,
    PlacementRequest,
    ProcessedMessage,
    Therapist,
)
from comms_tasks.task_names import HANDLE_MATCHING_EVENT as MATCHING
from comms_tasks.task_names import HANDLE_THERAPIST_EVENT as THERAPIST
from tests import factories as f
from tests.conftest import WorkerProcess, count_rows, other_service, wait_for, worker_environment
from tests.event_queue import bind_queue, drain, record_queued_events, relay_until_published
from tests.servers import PrivateRabbitMQ

pytestmark = pytest.mark.reliability

APPLIED_BEFORE_STOP = 100
# The sender sends this many back to back (a backlog on the queue), then one each pause.
BACKLOG = 3000
# At the stop, more messages wait than the worker may hold: its prefetch on a quorum
# queue is COMMS_INBOUND_BATCH (50) per process, two processes.
WAITING_AT_STOP = 300
BACKLOG_BEFORE_THE_WORKER = 1000
SEND_PAUSE_SECONDS = 0.01
OUTBOX_EVENTS_WHILE_DOWN = 20
DOWN_SECONDS = 3
LATE_THERAPIST = 100_000
SETTLED_SECONDS = 3
TIMEOUT = 120


def confirmed_sender(url: str) -> Celery:
    """Another service's app, whose ``send_task`` returns once the broker confirmed."""
    app = other_service(url)
    app.conf.broker_transport_options = {"confirm_publish": True}
    return app


class SteadySender(threading.Thread):
    """Sends a therapist upsert and a request creation after another, with confirms, until
    a send fails (the node went away) or it is told to stop. ``accepted`` holds the event
    id of each message whose ``send_task`` returned, ``attempted`` every one tried."""

    def __init__(self, url: str) -> None:
        super().__init__(name="steady-sender", daemon=True)
        self.app = confirmed_sender(url)
        self.attempted: dict[str, tuple[str, int]] = {}
        self.accepted: list[str] = []
        self.failure: str | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            for n in itertools.count(1):
                therapist = f.therapist_upserted(n)
                request = f.request_created(n, therapist_id=n, patient_id=10_000 + n)
                for task, event in ((THERAPIST, therapist), (MATCHING, request)):
                    if self.halt.is_set():
                        return
                    self.attempted[event["event_id"]] = (task, n)
                    self.app.send_task(task, kwargs={"event": event})
                    self.accepted.append(event["event_id"])
                    if len(self.accepted) > BACKLOG:
                        time.sleep(SEND_PAUSE_SECONDS)
        except Exception as exc:  # the stop is expected to end it here
            self.failure = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            self.app.close()


def test_rabbitmq_restart_mid_pipeline(
    private_rabbitmq: PrivateRabbitMQ,
    committed_db: Engine,
    committed_url: str,
    worker_log_dir: Path,
) -> None:
    url = private_rabbitmq.url
    queue = bind_queue(url, "restart-consumer")
    env = worker_environment(
        COMMS_DATABASE_URL=committed_url,
        COMMS_BROKER_URL=url,
        COMMS_VAR_DIR=str(worker_log_dir / "var-rabbitmq-restart"),
    )
    sender = SteadySender(url)

    def applied() -> int:
        return count_rows(committed_db, ProcessedMessage)

    def processed_ids() -> set[str]:
        with Session(committed_db) as session:
            return set(session.scalars(select(ProcessedMessage.message_id)).all())

    def settled(late_id: str) -> bool:
        """The message sent after the restart applied, and nothing applied for a while."""
        before = processed_ids()
        if late_id not in before:
            return False
        time.sleep(SETTLED_SECONDS)
        return processed_ids() == before

    # The worker applies faster than a sender with confirms publishes: a backlog is built
    # before it starts, and the node stops under both, with messages on the queue beyond
    # what the worker holds, a publish and a message being applied in flight.
    sender.start()
    worker: WorkerProcess | None = None
    try:
        wait_for(lambda: len(sender.accepted) > BACKLOG_BEFORE_THE_WORKER, timeout=TIMEOUT)
        worker = WorkerProcess(env, worker_log_dir / "worker-rabbitmq-restart.log")
        worker_pid = worker.process.pid
        worker.wait_for(
            lambda: (
                applied() >= APPLIED_BEFORE_STOP
                and len(sender.accepted) - applied() > WAITING_AT_STOP
            ),
            timeout=TIMEOUT,
        )
        private_rabbitmq.stop()
        stopped = time.monotonic()
        sender.halt.set()
        sender.join(timeout=60)
        assert not sender.is_alive(), "a send_task still blocked with the node down"
        accepted = set(sender.accepted)
        applied_at_stop = applied()
        recorded = record_queued_events(OUTBOX_EVENTS_WHILE_DOWN)
        time.sleep(DOWN_SECONDS)
        applied_while_down = applied()
        assert worker.process.poll() is None, worker.tail()
        # Mid-pipeline: messages the broker accepted were still waiting when it stopped.
        assert applied_while_down < len(accepted), "the node stopped after the pipeline drained"

        starting = time.monotonic()
        private_rabbitmq.start()
        restarted = time.monotonic()
        worker.wait_for(lambda: applied() > applied_while_down, timeout=TIMEOUT)
        # From the start command to the first message applied again (the node takes most).
        resumed_seconds = time.monotonic() - starting

        late_sender = confirmed_sender(url)
        try:
            late = f.therapist_upserted(LATE_THERAPIST)
            late_sender.send_task(THERAPIST, kwargs={"event": late})
            worker.wait_for(lambda: settled(late["event_id"]), timeout=TIMEOUT)
            drained_seconds = time.monotonic() - restarted - SETTLED_SECONDS

            relay_until_published(committed_db, late_sender, timeout=TIMEOUT)
        finally:
            late_sender.close()
        time.sleep(2)  # a late redelivery would be applied (or not) by now
        received = drain(url, queue, idle_seconds=2)

        done = processed_ids()
        sent = {**sender.attempted, late["event_id"]: (THERAPIST, LATE_THERAPIST)}
        lost = accepted - done
        in_flight = set(sender.attempted) - accepted
        therapists = count_rows(committed_db, Therapist)
        requests = count_rows(committed_db, PlacementRequest)
        dead = count_rows(committed_db, DeadLetter)
        with Session(committed_db) as session:
            outbox_ids = set(session.scalars(select(OutboxEvent.event_id)).all())
        counts = Counter(str(body["event_id"]) for body in received)
        log = worker.log()
        # One line per task run: a message taken again after the restart whose first run
        # had committed says result=duplicate, never applied twice.
        results = {name: log.count(f" result={name} ") for name in ("applied", "duplicate")}
        connects = log.count("Connected to amqp://")
        failed_connects = log.count("Cannot connect to amqp://")
        print(
            f"RELIABILITY rabbitmq_restart: accepted={len(accepted)} "
            f"in_flight_at_stop={len(in_flight)} applied_in_flight={len(in_flight & done)} "
            f"sender_stopped_by={sender.failure!r} "
            f"applied_at_stop={applied_at_stop} applied_while_down={applied_while_down} "
            f"applied={len(done)} lost={len(lost)} therapists={therapists} requests={requests} "
            f"dead_letters={dead} results_applied={results['applied']} "
            f"results_duplicate={results['duplicate']} connects={connects} "
            f"failed_connects={failed_connects} "
            f"outbox={len(outbox_ids)} recorded_while_down={len(recorded)} "
            f"relayed={sum(counts.values())} distinct_relayed={len(counts)} "
            f"down_seconds={starting - stopped:.1f} node_start_seconds={restarted - starting:.1f} "
            f"resumed_seconds={resumed_seconds:.1f} "
            f"drained_seconds={drained_seconds:.1f}"
        )
        assert not lost, f"{len(lost)} accepted messages never applied"
        assert done <= set(sent), "applied messages nobody sent"
        assert results["applied"] == len(done), "a message applied more than once"
        assert therapists == sum(sent[i][0] == THERAPIST for i in done)
        assert requests == sum(sent[i][0] == MATCHING for i in done)
        assert dead == 0
        assert set(recorded) <= outbox_ids
        assert counts == Counter({event_id: 1 for event_id in outbox_ids})
        assert worker.process.poll() is None, worker.tail()
        assert worker.process.pid == worker_pid
        assert connects >= 2, "connected again after the restart"
    finally:
        sender.halt.set()
        if worker is not None:
            worker.stop()
