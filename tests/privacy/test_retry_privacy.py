"""A retried inbound message shows its ids, never its patient data, on every path.

Celery republishes a retried task itself, and by default rebuilds ``kwargsrepr`` from the
kwargs, into the new message's headers and its ``task-sent`` event (what Flower shows).
Here a real worker (on Redis, then on RabbitMQ) retries a real outage: a trigger in the test
database refuses the message's ``processed_messages`` row with a serialization failure
(a transient error) until the test allows it. Meanwhile the test listens to every task
event, as Flower does, and reads what the broker shows of the retried message: every key
of the Redis database, where it waits (its headers are plain JSON there, its body base64),
or, on RabbitMQ, a copy of every republished message's headers and properties.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange, Queue, binding
from sqlalchemy import Engine

from comms_tasks.privacy.task_reprs import identifying_repr
from tests import factories as f
from tests.conftest import WorkerProcess, is_rabbitmq, wait_for
from tests.contracts.test_inbound_contracts import EMAIL_RESPONSE, email_response
from tests.inbound.test_inbound_failures import (  # noqa: F401 - the fixture, used by name
    SERIALIZATION_FAILURE,
    Refusals,
    refusals,
)
from tests.inbound.test_inbound_tasks import MATCHING

MARKER = "RETRIED-DIAGNOSIS-8c2d"


class EventLog:
    """Every task event on the broker, captured in a thread as Flower captures them."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def _listen(self) -> None:
        with self.app.connection_for_read() as connection:
            self._receiver = self.app.events.Receiver(
                # A name of its own: on RabbitMQ, receivers of one name share one queue.
                connection,
                handlers={"*": self.events.append},
                node_id=f"retry-privacy-test-{uuid.uuid4().hex}",
            )
            with contextlib.suppress(TimeoutError):
                self._receiver.capture(limit=None, timeout=120, wakeup=True)

    def start(self) -> None:
        self._thread.start()
        # Listening once the worker's heartbeats (every 2 s) arrive.
        wait_for(lambda: self.events, timeout=20)

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True

    def of(self, task_id: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("uuid") == task_id and e["type"] == kind]


class BrokerReader:
    """Reads every key of a Redis database over and over; keeps what holds ``needle``."""

    def __init__(self, url: str, needle: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.needle = needle.encode()
        self.found: list[str] = []
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _values(self, key: bytes) -> list[bytes]:
        kind = self.client.type(key)
        if kind == b"list":
            return list(self.client.lrange(key, 0, -1))
        if kind == b"hash":
            return list(self.client.hvals(key))
        if kind == b"zset":
            return list(self.client.zrange(key, 0, -1))
        if kind == b"set":
            return list(self.client.smembers(key))
        if kind == b"string":
            value = self.client.get(key)
            return [value] if value is not None else []
        return []

    def _read(self) -> None:
        while not self._stop.is_set():
            for key in self.client.scan_iter():
                for value in self._values(key):
                    if self.needle in value:
                        self.found.append(f"{key!r}: {value[:2000]!r}")
            self.reads += 1
            self._stop.wait(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.close()


class RabbitReader:
    """On RabbitMQ, a queue of the test's own bound to every exchange a retry can take (the
    task exchange and the delayed-delivery levels): each republished message is copied to
    it, and its headers and properties (what RabbitMQ shows as plain text) are searched."""

    EXCHANGES = ["comms.tasks", "celery_delayed_delivery"] + [
        f"celery_delayed_{level}" for level in range(28)
    ]

    def __init__(self, url: str, needle: str) -> None:
        self.url = url
        self.needle = needle
        self.found: list[str] = []
        self.reads = 0
        self._stop = threading.Event()
        self._queue = Queue(
            "retry-privacy-spy",
            bindings=[
                binding(Exchange(name, type="topic"), routing_key="#") for name in self.EXCHANGES
            ],
            durable=False,
            auto_delete=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._ready = threading.Event()

    def _on_message(self, body: Any, message: Any) -> None:
        shown = repr(message.headers) + repr(message.properties)
        if self.needle in shown:
            self.found.append(shown[:2000])
        self.reads += 1
        message.ack()

    def _read(self) -> None:
        with (
            Connection(self.url) as connection,
            connection.Consumer(self._queue, callbacks=[self._on_message], accept=["json"]),
        ):
            self._ready.set()
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError, socket.timeout):
                    connection.drain_events(timeout=0.2)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(timeout=20), "the spy queue was not declared"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def event_log(sender: Celery) -> Iterator[EventLog]:
    log = EventLog(sender)
    yield log
    log.stop()


def email_response_with_marker() -> tuple[str, str, dict[str, Any]]:
    # The answer names no known email: once allowed, it is a dead letter, which may
    # keep the text (the letter is governed by retention and erasure).
    command = email_response(content=f"Frau M. ({MARKER}) kann ich ab Januar aufnehmen.")
    return EMAIL_RESPONSE, "command", command


def request_created_with_marker() -> tuple[str, str, dict[str, Any]]:
    event = f.request_created(
        83, patient_id=8300, diagnosis=MARKER, current_complaints=MARKER, time_availability=MARKER
    )
    return MATCHING, "event", event


@pytest.mark.parametrize(
    "message", [email_response_with_marker, request_created_with_marker], ids=["answer", "summary"]
)
def test_a_retried_inbound_task_shows_only_ids_in_events_and_broker_headers(
    worker: WorkerProcess,
    committed_db: Engine,
    sender: Celery,
    worker_broker_url: str,
    refusals: Refusals,  # noqa: F811 - the fixture imported above
    event_log: EventLog,
    message: Callable[[], tuple[str, str, dict[str, Any]]],
) -> None:
    task_name, argument, body = message()
    message_id = str(body.get("event_id") or body["command_id"])
    event_log.start()
    refusals.refuse(message_id, SERIALIZATION_FAILURE)
    reader: BrokerReader | RabbitReader
    if is_rabbitmq(worker_broker_url):
        reader = RabbitReader(worker_broker_url, MARKER)
    else:
        reader = BrokerReader(worker_broker_url, MARKER)
    reader.start()
    try:
        # A careful sender (like `comms`): its own message shows ids only.
        argsrepr, kwargsrepr = identifying_repr([], {argument: body})
        task_id = sender.send_task(
            task_name, kwargs={argument: body}, argsrepr=argsrepr, kwargsrepr=kwargsrepr
        ).id

        # Refused twice: two retries republished by the worker, each waiting on the broker.
        worker.wait_for(lambda: refusals.attempts() >= 3)
        refusals.allow(message_id)
        worker.wait_for(lambda: event_log.of(task_id, "task-succeeded"))
    finally:
        reader.stop()

    # The retries were seen: republished (task-sent) and received again.
    resent = [e for e in event_log.of(task_id, "task-sent") if e.get("retries")]
    assert len(resent) >= 2, event_log.of(task_id, "task-sent")
    assert len(event_log.of(task_id, "task-retried")) >= 2
    assert len(event_log.of(task_id, "task-received")) >= 3
    for sent in resent:
        assert message_id in sent["kwargs"]
    for reported in event_log.events:
        assert MARKER not in repr(reported), reported
    # Redis: scans of its keys; RabbitMQ: the retried messages themselves.
    assert reader.reads >= 2
    assert reader.found == []
    # A retry names the outage by its class, not by the server's message.
    for retried in event_log.of(task_id, "task-retried"):
        assert "OperationalError" in retried["exception"]
        assert "refused by the test" not in repr(retried)
    assert MARKER not in worker.log()
    assert "refused by the test" not in worker.log()
