"""The worker's configuration, as Flower's worker "Config" tab shows it, holds no secret.

Flower reads it with ``celery inspect conf``. A real worker is started with a password in
every setting that can hold one (broker, result backend, RedBeat, events broker,
database, SMTP) and asked for its configuration over the broker, as Flower does; no
password may appear anywhere in the reply. The shared Redis has no password, so it
accepts any password for its ``default`` user: the URLs work as given. Redis only: the
masking is the same for every URL (``mask_credentials``), and the shared RabbitMQ knows
only guest's password.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy.engine import make_url

from comms_tasks.worker.censored_conf import mask_credentials
from tests.conftest import REDIS_URL, WorkerProcess, worker_environment

INSPECT_TIMEOUT = 10


def with_password(url: str, user: str, password: str) -> str:
    return make_url(url).set(username=user, password=password).render_as_string(False)


@pytest.fixture
def passwords() -> dict[str, str]:
    return {
        name: f"{name}-{secrets.token_hex(8)}"
        for name in ("broker", "result", "redbeat", "events", "database", "smtp")
    }


@pytest.fixture
def worker_with_passwords(
    committed_url: str, passwords: dict[str, str], tmp_path: Path
) -> Iterator[tuple[WorkerProcess, str, str]]:
    redis_with = {
        name: REDIS_URL.replace("redis://", f"redis://default:{passwords[name]}@", 1)
        for name in ("broker", "result", "redbeat", "events")
    }
    env = worker_environment(
        COMMS_DATABASE_URL=with_password(committed_url, "postgres", passwords["database"]),
        COMMS_BROKER_URL=redis_with["broker"],
        COMMS_RESULT_BACKEND=redis_with["result"],
        COMMS_REDBEAT_REDIS_URL=redis_with["redbeat"],
        COMMS_EVENTS_BROKER_URL=redis_with["events"],
        COMMS_MAIL_BACKEND="smtp",
        COMMS_SMTP_USERNAME="relay-user",
        COMMS_SMTP_PASSWORD=passwords["smtp"],
        COMMS_VAR_DIR=str(tmp_path / "var"),
    )
    name = f"conftest-{uuid.uuid4().hex[:8]}@localhost"
    worker = WorkerProcess(env, tmp_path / "worker.log", "-n", name, "-Q", f"q-{name}")
    try:
        yield worker, name, redis_with["broker"]
    finally:
        worker.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.mark.parametrize("with_defaults", [False, True])
def test_inspect_conf_shows_no_password(
    worker_with_passwords: tuple[WorkerProcess, str, str],
    passwords: dict[str, str],
    with_defaults: bool,
) -> None:
    worker, name, broker_url = worker_with_passwords
    client = Celery("flower-like", broker=broker_url, set_as_current=False)
    try:
        replies = client.control.inspect(destination=[name], timeout=INSPECT_TIMEOUT).conf(
            with_defaults=with_defaults
        )
    finally:
        client.close()

    assert replies and name in replies, worker.tail()
    conf = replies[name]
    # The settings are there, with their passwords masked.
    assert "redbeat_redis_url" in conf and "broker_url" in conf, sorted(conf)
    shown = json.dumps(conf)
    leaked = [kind for kind, password in passwords.items() if password in shown]
    where = [
        key
        for key, value in conf.items()
        if any(p in json.dumps(value) for p in passwords.values())
    ]
    assert leaked == [], where


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("redis://:pw@redis:6379/1", "redis://:********@redis:6379/1"),
        ("redis://default:pw@redis:6379/1", "redis://default:********@redis:6379/1"),
        ("postgresql+psycopg2://u:p@ss@db/x", "postgresql+psycopg2://u:********@db/x"),
        ("amqp://u:p@a//;amqp://u:q@b//", "amqp://u:********@a//;amqp://u:********@b//"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ({"a": ["x://u:p@h"]}, {"a": ["x://u:********@h"]}),
    ],
)
def test_mask_credentials_masks_every_url_password(value: object, expected: object) -> None:
    assert mask_credentials(value) == expected
