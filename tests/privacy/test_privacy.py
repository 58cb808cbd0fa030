"""Patient data never leaves the worker in task events (what Flower shows) or its log."""

from __future__ import annotations

import contextlib
import threading
import uuid
from typing import Any

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from comms_tasks.models import Patient
from comms_tasks.privacy.task_reprs import identifying_repr
from tests import factories as f
from tests.conftest import WorkerProcess, wait_for

MARKER = "PLANTED-DIAGNOSIS-5f1e"


def test_identifying_repr_keeps_ids_only() -> None:
    event = f.request_created(1, diagnosis=MARKER)
    args, kwargs = identifying_repr([], {"event": event})
    assert MARKER not in args + kwargs
    assert event["event_id"] in kwargs
    assert "placement_request.created" in kwargs


def test_task_events_and_worker_log_carry_ids_not_patient_data(
    worker: WorkerProcess, committed_db: Engine, sender: Celery
) -> None:
    events: list[dict[str, Any]] = []
    receivers: list[Any] = []

    def listen() -> None:
        with sender.connection_for_read() as connection:
            receiver = sender.events.Receiver(
                # A name of its own: on RabbitMQ, receivers of one name share one queue.
                connection,
                handlers={"*": events.append},
                node_id=f"privacy-test-{uuid.uuid4().hex}",
            )
            receivers.append(receiver)
            with contextlib.suppress(TimeoutError):
                receiver.capture(limit=None, timeout=60, wakeup=True)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    # Listening once the worker's heartbeats arrive (every 2 s): its events reach us.
    wait_for(lambda: events, timeout=20)

    event = f.request_created(81, patient_id=8100, diagnosis=MARKER, current_complaints=MARKER)
    # A careless sender puts the whole payload into the reprs it sends along.
    sender.send_task(
        "comms.handle_matching_event",
        kwargs={"event": event},
        kwargsrepr=repr({"event": event}),
    )

    def applied() -> bool:
        with Session(committed_db) as session:
            patient = session.get(Patient, 8100)
            return patient is not None and patient.diagnosis == MARKER

    wait_for(applied)
    received = wait_for(
        lambda: [e for e in events if e.get("type") == "task-received" and e.get("uuid")]
    )
    wait_for(lambda: any(e.get("type") == "task-succeeded" for e in events))
    assert event["event_id"] in received[0]["kwargs"]
    for reported in events:
        assert MARKER not in repr(reported)
    assert MARKER not in worker.log()
    receivers[0].should_stop = True
