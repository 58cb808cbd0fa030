"""Flower's Broker page on RabbitMQ: the task queue with its messages, read from the
management API (``FLOWER_BROKER_API``, as docker-compose.rabbitmq.yml sets it).

A private RabbitMQ node with the management plugin (the machine's shared node has none);
messages wait in the queue while no worker consumes it, and Flower shows how many.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests import factories as f
from tests.conftest import other_service, wait_for
from tests.inbound.test_inbound_tasks import THERAPIST
from tests.servers import PrivateRabbitMQ
from tests.worker.test_flower import FlowerProcess, flower_environment

WAITING = 3


@pytest.fixture
def managed_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    server = PrivateRabbitMQ(management=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


def test_flowers_broker_page_shows_the_task_queue_and_its_messages(
    managed_rabbitmq: PrivateRabbitMQ, committed_db: Engine, committed_url: str, tmp_path: Path
) -> None:
    sender = other_service(managed_rabbitmq.url)
    try:
        for number in range(WAITING):
            sender.send_task(THERAPIST, kwargs={"event": f.therapist_upserted(9400 + number)})
    finally:
        sender.close()
    api = f"http://guest:guest@127.0.0.1:{managed_rabbitmq.management_port}/api/"
    env = flower_environment(
        COMMS_DATABASE_URL=committed_url,
        COMMS_BROKER_URL=managed_rabbitmq.url,
        COMMS_VAR_DIR=str(tmp_path / "var"),
    )
    env["FLOWER_BROKER_API"] = api
    flower = FlowerProcess(env, tmp_path / "flower.log")
    try:

        def queue_shown() -> dict[str, object] | None:
            status, body = flower.get("/api/queues/length")
            if status != 200:
                return None
            queues = {q["name"]: q for q in json.loads(body).get("active_queues", [])}
            celery = queues.get("celery")
            # The management API's counts lag a few seconds behind the queue.
            return celery if celery and celery.get("messages") == WAITING else None

        shown = wait_for(queue_shown, timeout=60, explain=flower.tail)
        status, page = flower.get("/broker")
    finally:
        flower.stop()

    assert shown["messages"] == WAITING
    assert status == 200
    assert "celery" in page and f"127.0.0.1:{managed_rabbitmq.port}" in page
