"""Redis and PostgreSQL restarted under a running worker: nothing accepted is lost.

Each test starts private servers on free ports (never the machine's shared ones) and a real
``celery worker``. Redis runs with ``--save ""``: its data is gone after a restart, so a
message published before the stop and not yet consumed may be lost. That is the broker's
contract, not the service's; the Redis test therefore counts only what was accepted while
Redis was up: the first half before the stop (all applied before it), the second after.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from comms_tasks import migrate
from comms_tasks.db import make_engine
from comms_tasks.models import DeadLetter, OutboxEvent, ProcessedMessage, Therapist
from tests import factories as f
from tests.conftest import WorkerProcess, count_rows, other_service, worker_environment
from tests.event_queue import bind_queue, drain, record_queued_events, relay_until_published
from tests.reliability.servers import PrivatePostgres
from tests.servers import PrivateRedis

pytestmark = pytest.mark.reliability

THERAPIST = "comms.handle_therapist_event"
RELAY = "comms.relay_outbox"
REDIS_EVENTS = 50
OUTBOX_EVENTS_WHILE_DOWN = 20
POSTGRES_EVENTS = 100
POSTGRES_DOWN_SECONDS = 5
BROKER_SLOT = 8  # the broker_url fixture: the PostgreSQL restart test runs on each broker
TIMEOUT = 90


def safe_count(engine: Engine, model: type, *where: object) -> int:
    """Like :func:`count_rows`, but -1 while the database is unreachable."""
    try:
        return count_rows(engine, model, *where)
    except OperationalError:
        return -1


def send_therapists(app: Celery, ids: range) -> None:
    for therapist_id in ids:
        app.send_task(THERAPIST, kwargs={"event": f.therapist_upserted(therapist_id)})


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    yield server
    server.close()


def test_redis_restart_mid_pipeline(
    private_redis: PrivateRedis,
    committed_db: Engine,
    committed_url: str,
    worker_log_dir: Path,
) -> None:
    env = worker_environment(
        COMMS_DATABASE_URL=committed_url,
        COMMS_BROKER_URL=private_redis.url,
        COMMS_VAR_DIR=str(worker_log_dir / "var-redis-restart"),
    )
    worker = WorkerProcess(env, worker_log_dir / "worker-redis-restart.log")
    sender = other_service(private_redis.url)
    half = REDIS_EVENTS // 2
    try:
        send_therapists(sender, range(1, half + 1))
        worker.wait_for(lambda: count_rows(committed_db, ProcessedMessage) >= half, timeout=TIMEOUT)

        private_redis.stop()
        recorded = record_queued_events(OUTBOX_EVENTS_WHILE_DOWN)
        time.sleep(3)
        assert worker.process.poll() is None, worker.tail()

        private_redis.start()
        restarted = time.monotonic()
        send_therapists(sender, range(half + 1, REDIS_EVENTS + 1))
        worker.wait_for(lambda: count_rows(committed_db, ProcessedMessage) > half, timeout=TIMEOUT)
        recovered = time.monotonic() - restarted
        worker.wait_for(
            lambda: count_rows(committed_db, ProcessedMessage) >= REDIS_EVENTS, timeout=TIMEOUT
        )

        queue = bind_queue(private_redis.url, "restart-consumer")

        relay_until_published(committed_db, sender, timeout=TIMEOUT)
        received = drain(private_redis.url, queue, idle_seconds=2)

        applied = count_rows(committed_db, ProcessedMessage)
        therapists = count_rows(committed_db, Therapist)
        with Session(committed_db) as session:
            outbox_ids = set(session.scalars(select(OutboxEvent.event_id)).all())
        counts = Counter(str(body["event_id"]) for body in received)
        print(
            f"RELIABILITY redis_restart: events={REDIS_EVENTS} applied={applied} "
            f"therapists={therapists} outbox={len(outbox_ids)} relayed={sum(counts.values())} "
            f"distinct_relayed={len(counts)} recover_seconds={recovered:.1f}"
        )
        assert applied == REDIS_EVENTS
        assert therapists == REDIS_EVENTS
        assert count_rows(committed_db, DeadLetter) == 0
        assert set(recorded) <= outbox_ids
        assert counts == Counter({event_id: 1 for event_id in outbox_ids})
        assert worker.process.poll() is None, worker.tail()
    finally:
        sender.close()
        worker.stop()


def test_postgres_restart_mid_pipeline(
    private_postgres: PrivatePostgres, broker_url: str, worker_log_dir: Path
) -> None:
    url = private_postgres.create_database("comms")
    migrate.upgrade(url)
    engine = make_engine(url, connect_args={"connect_timeout": 2})
    env = worker_environment(
        COMMS_DATABASE_URL=url,
        COMMS_BROKER_URL=broker_url,
        COMMS_VAR_DIR=str(worker_log_dir / "var-postgres-restart"),
    )
    worker = WorkerProcess(env, worker_log_dir / "worker-postgres-restart.log")
    sender = other_service(broker_url)
    try:
        send_therapists(sender, range(1, POSTGRES_EVENTS + 1))
        worker.wait_for(lambda: count_rows(engine, ProcessedMessage) >= 10, timeout=TIMEOUT)
        applied_at_stop = count_rows(engine, ProcessedMessage)
        engine.dispose()
        private_postgres.stop()
        stopped = time.monotonic()
        time.sleep(POSTGRES_DOWN_SECONDS)
        private_postgres.start()
        applied_at_restart = count_rows(engine, ProcessedMessage)
        restarted = time.monotonic()
        worker.wait_for(
            lambda: safe_count(engine, ProcessedMessage) >= POSTGRES_EVENTS, timeout=TIMEOUT
        )
        recovered = time.monotonic() - restarted
        time.sleep(2)  # a late duplicate would show up here

        applied = count_rows(engine, ProcessedMessage)
        therapists = count_rows(engine, Therapist)
        dead = count_rows(engine, DeadLetter)
        retries = sum("retry" in line.lower() for line in worker.log().splitlines())
        print(
            f"RELIABILITY postgres_restart: events={POSTGRES_EVENTS} "
            f"applied_at_stop={applied_at_stop} applied_at_restart={applied_at_restart}"
            f" applied={applied} "
            f"therapists={therapists} dead_letters={dead} retries_logged={retries} "
            f"down_seconds={restarted - stopped:.1f} recover_seconds={recovered:.1f}"
        )
        assert applied == POSTGRES_EVENTS
        assert therapists == POSTGRES_EVENTS
        assert dead == 0
        assert worker.process.poll() is None, worker.tail()
    finally:
        sender.close()
        worker.stop()
        engine.dispose()
