"""Consuming the exchange ``comms.events`` in tests, as another service would."""

from __future__ import annotations

from kombu import Connection, Consumer, Queue

from comms_tasks.outbox import events_exchange


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
