"""RabbitMQ stopped and started again under a running worker: nothing accepted is lost.

The node is a private one (``PrivateRabbitMQ``: its own node name, ports and data under a
temporary folder, never the machine's ``rabbit@localhost``). Unlike the private Redis, it
keeps its data over a restart: the task queue is a quorum queue and messages are
persistent, so every message the broker confirmed before the stop must be applied, once,
after it, including those a worker process had taken but not yet acknowledged.

The sender publishes with confirms: a ``send_task`` that returned is a message the broker
accepted. Outbox events recorded while the node is down are relayed after the restart to a
durable queue bound to ``comms.events`` before the stop.
"""

from __future__ import annotations

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
from comms_tasks.task_names import HANDLE_MATCHING_EVENT, HANDLE_THERAPIST_EVENT, RELAY_OUTBOX
from tests import factories as f
from tests.conftest import WorkerProcess, count_rows, other_service, worker_environment
from tests.event_queue import bind_queue, drain, record_queued_events
from tests.servers import PrivateRabbitMQ

pytestmark = pytest.mark.reliability

PAIRS = 400  # a therapist upsert and a request creation each: 800 inbound messages
APPLIED_BEFORE_STOP = 100
OUTBOX_EVENTS_WHILE_DOWN = 20
DOWN_SECONDS = 3
LATE_THERAPIST = 100_000
TIMEOUT = 120


def confirmed_sender(url: str) -> Celery:
    """Another service's app, whose ``send_task`` returns once the broker confirmed."""
    app = other_service(url)
    app.conf.broker_transport_options = {"confirm_publish": True}
    return app


def send_pairs(app: Celery, ids: range) -> None:
    for n in ids:
        app.send_task(HANDLE_THERAPIST_EVENT, kwargs={"event": f.therapist_upserted(n)})
        app.send_task(
            HANDLE_MATCHING_EVENT,
            kwargs={"event": f.request_created(n, therapist_id=n, patient_id=10_000 + n)},
        )


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
    worker = WorkerProcess(env, worker_log_dir / "worker-rabbitmq-restart.log")
    worker_pid = worker.process.pid
    sender = confirmed_sender(url)
    inbound = 2 * PAIRS

    def applied() -> int:
        return count_rows(committed_db, ProcessedMessage)

    try:
        started = time.monotonic()
        send_pairs(sender, range(1, PAIRS + 1))
        sent_seconds = time.monotonic() - started
        sender.close()  # its connection would otherwise see the node go away
        worker.wait_for(lambda: applied() >= APPLIED_BEFORE_STOP, timeout=TIMEOUT)

        private_rabbitmq.stop()
        stopped = time.monotonic()
        applied_at_stop = applied()
        recorded = record_queued_events(OUTBOX_EVENTS_WHILE_DOWN)
        time.sleep(DOWN_SECONDS)
        applied_while_down = applied()
        assert worker.process.poll() is None, worker.tail()
        # Mid-pipeline: messages the broker accepted were still waiting when it stopped.
        assert applied_while_down < inbound, "the node stopped after the pipeline drained"

        starting = time.monotonic()
        private_rabbitmq.start()
        restarted = time.monotonic()
        worker.wait_for(lambda: applied() > applied_while_down, timeout=TIMEOUT)
        # From the start command to the first message applied again (the node takes most).
        resumed_seconds = time.monotonic() - starting

        late_sender = confirmed_sender(url)
        try:
            late_sender.send_task(
                HANDLE_THERAPIST_EVENT, kwargs={"event": f.therapist_upserted(LATE_THERAPIST)}
            )
            worker.wait_for(lambda: applied() >= inbound + 1, timeout=TIMEOUT)
            drained_seconds = time.monotonic() - restarted

            def relayed() -> bool:
                if count_rows(committed_db, OutboxEvent, OutboxEvent.published_at.is_(None)) == 0:
                    return True
                late_sender.send_task(RELAY_OUTBOX)
                time.sleep(1)
                return False

            worker.wait_for(relayed, timeout=TIMEOUT)
        finally:
            late_sender.close()
        time.sleep(2)  # a late redelivery would be applied (or not) by now
        received = drain(url, queue, idle_seconds=2)

        processed = applied()
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
            f"RELIABILITY rabbitmq_restart: inbound={inbound} send_seconds={sent_seconds:.1f} "
            f"applied_at_stop={applied_at_stop} applied_while_down={applied_while_down} "
            f"applied={processed} therapists={therapists} requests={requests} "
            f"dead_letters={dead} results_applied={results['applied']} "
            f"results_duplicate={results['duplicate']} connects={connects} "
            f"failed_connects={failed_connects} "
            f"outbox={len(outbox_ids)} recorded_while_down={len(recorded)} "
            f"relayed={sum(counts.values())} distinct_relayed={len(counts)} "
            f"down_seconds={starting - stopped:.1f} node_start_seconds={restarted - starting:.1f} "
            f"resumed_seconds={resumed_seconds:.1f} "
            f"drained_seconds={drained_seconds:.1f}"
        )
        assert processed == inbound + 1
        assert results["applied"] == inbound + 1
        assert therapists == PAIRS + 1
        assert requests == PAIRS
        assert dead == 0
        assert set(recorded) <= outbox_ids
        assert counts == Counter({event_id: 1 for event_id in outbox_ids})
        assert worker.process.poll() is None, worker.tail()
        assert worker.process.pid == worker_pid
        assert connects >= 2, "connected again after the restart"
    finally:
        sender.close()
        worker.stop()
