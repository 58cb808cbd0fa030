"""On RabbitMQ, what the worker declares and how it consumes, read off the broker itself.

A real worker on a RabbitMQ virtual host of its own (the session worker, RabbitMQ only);
``rabbitmqctl`` lists what the node holds: the task queue is a durable quorum queue,
the worker's channels take no global QoS (quorum queues refuse it), task publishes and
the outbox relay are confirmed, and an event reaches a bound queue as a persistent
message of the durable topic exchange ``comms.events``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection
from sqlalchemy import Engine

from comms_tasks.events.tasks import relay_outbox
from comms_tasks.settings import get_settings
from tests import factories as f
from tests.conftest import (
    WorkerProcess,
    other_service,
    rabbitmqctl,
    vhost_of,
    wait_for,
    worker_environment,
)
from tests.event_queue import bind_queue, record_queued_events
from tests.inbound.test_inbound_tasks import THERAPIST, therapist

pytestmark = pytest.mark.parametrize("broker_kind", ["rabbitmq"], indirect=True)


def listed(what: str, vhost: str | None, *columns: str) -> list[dict[str, Any]]:
    arguments = [what, "--formatter", "json", *(["-p", vhost] if vhost else []), *columns]
    return list(json.loads(rabbitmqctl(*arguments)))


def test_the_task_queue_is_a_durable_quorum_queue_consumed_without_global_qos(
    worker: WorkerProcess, committed_db: Engine, sender: Celery, worker_broker_url: str
) -> None:
    vhost = vhost_of(worker_broker_url)
    sender.send_task(THERAPIST, kwargs={"event": f.therapist_upserted(9301)})
    worker.wait_for(lambda: therapist(committed_db, 9301))

    queues = {q["name"]: q for q in listed("list_queues", vhost, "name", "type", "durable")}
    assert queues["celery"]["type"] == "quorum", queues["celery"]
    assert queues["celery"]["durable"] is True
    exchanges = {e["name"]: e for e in listed("list_exchanges", vhost, "name", "type", "durable")}
    assert exchanges["comms.tasks"]["type"] == "topic"
    assert exchanges["comms.tasks"]["durable"] is True
    # The delayed delivery levels a countdown (an inbound retry) waits in.
    assert {"celery_delayed_0", "celery_delayed_27"} <= set(queues)

    channels = [
        c
        for c in listed(
            "list_channels",
            None,
            "vhost",
            "consumer_count",
            "prefetch_count",
            "global_prefetch_count",
        )
        if c["vhost"] == vhost and c["consumer_count"]
    ]
    assert channels, "the worker has no consuming channel on its virtual host"
    for channel in channels:
        assert channel["global_prefetch_count"] == 0, channel
    # A quorum queue's consumer cannot raise its prefetch while it consumes: the inbound
    # batch size (the multiplier) times concurrency 2, per consumer, from the start.
    expected = get_settings().inbound_batch * 2
    assert max(channel["prefetch_count"] for channel in channels) == expected, channels


def test_events_are_confirmed_and_persistent_on_a_durable_topic_exchange(
    committed_db: Engine, worker_broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMMS_EVENTS_BROKER_URL", worker_broker_url)
    get_settings.cache_clear()
    queue = bind_queue(worker_broker_url, "setup-consumer")
    [event_id] = record_queued_events(1, first_email_id=9302)

    assert relay_outbox()["published"] == 1

    vhost = vhost_of(worker_broker_url)
    exchanges = {e["name"]: e for e in listed("list_exchanges", vhost, "name", "type", "durable")}
    assert exchanges["comms.events"]["type"] == "topic"
    assert exchanges["comms.events"]["durable"] is True
    with Connection(worker_broker_url) as connection:
        message = wait_for(lambda: queue(connection.default_channel).get(no_ack=True))
    assert message.properties["delivery_mode"] == 2
    assert message.properties["message_id"] == event_id
    get_settings.cache_clear()


def test_a_queue_of_its_own_declared_first_by_a_sender_with_celerys_defaults(
    committed_db: Engine, committed_url: str, worker_broker_url: str, tmp_path: Path
) -> None:
    """``-Q name``: the sender (Celery's defaults) declared the queue and its direct exchange
    first; the worker declares them alike instead of failing on a topic exchange."""
    sender = other_service(worker_broker_url)
    try:
        sender.send_task(THERAPIST, kwargs={"event": f.therapist_upserted(9303)}, queue="own-queue")
        env = worker_environment(
            COMMS_DATABASE_URL=committed_url,
            COMMS_BROKER_URL=worker_broker_url,
            COMMS_VAR_DIR=str(tmp_path / "var"),
        )
        process = WorkerProcess(env, tmp_path / "worker.log", "-Q", "own-queue", "-n", "own@%h")
        try:
            process.wait_for(lambda: therapist(committed_db, 9303))
            process.check_alive()
        finally:
            process.stop()
    finally:
        sender.close()
