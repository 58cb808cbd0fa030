"""On RabbitMQ the relay marks an event published only once the broker confirmed it.

A queue bound to ``comms.events`` that is full and refuses more (``x-max-length: 0``,
``x-overflow: reject-publish``) makes RabbitMQ answer the publish with a nack. Without
publisher confirms the publish returns as if the event were delivered, and the row would
be marked published while no consumer ever gets it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kombu import Connection, Queue
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.events.outbox import events_exchange
from comms_tasks.events.tasks import relay_outbox
from comms_tasks.models import OutboxEvent
from comms_tasks.settings import get_settings
from tests.conftest import broker_url_of, drop_broker, empty_broker
from tests.event_queue import bind_queue, drain, record_queued_events

BROKER_SLOT = 16


@pytest.fixture
def rabbitmq_events(committed_db: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``comms.events`` on a RabbitMQ virtual host of this test's own, the tasks elsewhere."""
    url = broker_url_of("rabbitmq", BROKER_SLOT)
    empty_broker(url)
    monkeypatch.setenv("COMMS_EVENTS_BROKER_URL", url)
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()
    drop_broker(url)


def refusing_queue(url: str) -> None:
    queue = Queue(
        "full-consumer",
        exchange=events_exchange,
        routing_key="#",
        durable=True,
        # Classic: a quorum queue takes one message past its limit before it refuses.
        queue_arguments={
            "x-queue-type": "classic",
            "x-max-length": 0,
            "x-overflow": "reject-publish",
        },
    )
    with Connection(url) as connection:
        queue(connection.default_channel).declare()


def published(engine: Engine) -> int:
    with Session(engine) as session:
        rows = session.scalars(select(OutboxEvent)).all()
        return sum(row.published_at is not None for row in rows)


def test_an_event_the_broker_refuses_stays_pending(
    rabbitmq_events: str, committed_db: Engine
) -> None:
    refusing_queue(rabbitmq_events)
    record_queued_events(3)

    report = relay_outbox()

    assert report["published"] == 0, report
    assert report["error"], report
    assert published(committed_db) == 0


def test_confirmed_events_are_published_once_each(
    rabbitmq_events: str, committed_db: Engine
) -> None:
    queue = bind_queue(rabbitmq_events)
    events = record_queued_events(4)

    assert relay_outbox()["published"] == 4
    assert relay_outbox()["published"] == 0

    assert sorted(str(body["event_id"]) for body in drain(rabbitmq_events, queue)) == sorted(events)
    assert published(committed_db) == 4


def test_an_amqp_url_in_capitals_is_confirmed_too(
    rabbitmq_events: str, committed_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """URL schemes are case-insensitive, and kombu takes ``AMQP://`` to RabbitMQ."""
    monkeypatch.setenv("COMMS_EVENTS_BROKER_URL", "AMQP" + rabbitmq_events[len("amqp") :])
    get_settings.cache_clear()
    refusing_queue(rabbitmq_events)
    record_queued_events(3)

    report = relay_outbox()

    assert report["published"] == 0, report
    assert published(committed_db) == 0
