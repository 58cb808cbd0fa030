"""Events in tests: recorded in the outbox, and consumed from the exchange ``comms.events``
as another service would."""

from __future__ import annotations

import time

from celery import Celery
from kombu import Connection, Consumer, Queue
from sqlalchemy import Engine

from comms_tasks.contracts.published import EmailQueuedPayload
from comms_tasks.db import transaction
from comms_tasks.events.outbox import events_exchange, record_event
from comms_tasks.models import OutboxEvent
from comms_tasks.task_names import RELAY_OUTBOX
from tests.conftest import count_rows, wait_for


def record_queued_events(count: int, first_email_id: int = 1) -> list[str]:
    """``count`` ``email.queued`` events in the outbox, one transaction; their event ids."""
    with transaction() as session:
        return [
            record_event(
                session,
                EmailQueuedPayload(email_id=email_id, therapist_id=1, placement_request_ids=[2]),
            )
            for email_id in range(first_email_id, first_email_id + count)
        ]


def bind_queue(url: str, name: str = "test-consumer", routing_key: str = "#") -> Queue:
    """A durable queue bound to ``comms.events``, declared on the broker at ``url``."""
    queue = Queue(name, exchange=events_exchange, routing_key=routing_key, durable=True)
    with Connection(url) as connection:
        queue(connection.default_channel).declare()
    return queue


def drain(url: str, queue: Queue, idle_seconds: float = 1) -> list[dict[str, object]]:
    """Every message waiting on ``queue``, acknowledged; stops after ``idle_seconds`` of quiet."""
    received: list[dict[str, object]] = []
    with Connection(url) as connection:

        def on_message(body: dict[str, object], message: object) -> None:
            received.append(body)
            message.ack()  # type: ignore[attr-defined]

        with Consumer(connection, queues=[queue], callbacks=[on_message], accept=["json"]):
            while True:
                try:
                    connection.drain_events(timeout=idle_seconds)
                except TimeoutError:
                    break
    return received


def relay_until_published(engine: Engine, sender: Celery, timeout: float = 90) -> None:
    """Send ``comms.relay_outbox`` as beat would, once a second, until no event is pending."""

    def relayed() -> bool:
        if count_rows(engine, OutboxEvent, OutboxEvent.published_at.is_(None)) == 0:
            return True
        sender.send_task(RELAY_OUTBOX)
        time.sleep(1)
        return False

    wait_for(relayed, timeout=timeout)
