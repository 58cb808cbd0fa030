"""Inbound messages that wait while the pool is busy are applied together, in one
transaction, and whatever a batch cannot apply runs on its own as before.

First the pool side (:func:`comms_tasks.inbound.batch.apply_batch`, called here in this
process on the committed database), then a real worker on each broker taking a full
queue. Which messages shared a transaction is read off PostgreSQL itself: the rows one
transaction inserted carry its id (``xmin``).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from comms_tasks.inbound.batch import MAX_ATTEMPTS, Batch, Item
from comms_tasks.inbound.batch import apply_batch as apply_in_pool
from comms_tasks.models import DeadLetter, ProcessedMessage, Therapist
from tests import factories as f
from tests.conftest import (
    WorkerProcess,
    broker_environment,
    broker_url_of,
    is_rabbitmq,
    other_service,
    rabbitmqctl,
    vhost_of,
    wait_for,
    waiting_on_locks,
)
from tests.inbound.test_inbound_failures import (  # noqa: F401 - the fixture, used by name
    SERIALIZATION_FAILURE,
    Refusals,
    refusals,
)
from tests.inbound.test_inbound_tasks import MATCHING, THERAPIST, therapist

BROKER_SLOT = 0  # the broker_url fixture: this module's broker, on each kind


def item(task_name: str, event: dict[str, Any]) -> Item:
    return (task_name, str(uuid.uuid4()), (), {"event": event})


def apply_batch(items: list[Item]) -> list[dict[str, Any] | None]:
    return apply_in_pool(Batch(items))


def transactions(engine: Engine) -> int:
    """How many transactions wrote the ``processed_messages`` rows."""
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(f"SELECT count(DISTINCT xmin::text) FROM {ProcessedMessage.__table__}")
            ).scalar_one()
        )


def processed(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(ProcessedMessage)) or 0)


def therapists(engine: Engine) -> set[int]:
    with Session(engine) as session:
        return set(session.scalars(select(Therapist.id)))


def letters(engine: Engine) -> list[DeadLetter]:
    with Session(engine) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


# --- the pool side -----------------------------------------------------------------------


def test_a_batch_applies_its_messages_in_one_transaction(committed_db: Engine) -> None:
    events = [f.therapist_upserted(n) for n in (1, 2, 3)]
    created = f.request_created(11, patient_id=1100, therapist_id=1)

    outcomes = apply_batch([*(item(THERAPIST, e) for e in events), item(MATCHING, created)])

    assert [o and o["result"] for o in outcomes] == ["applied"] * 4
    assert [o and o["message_id"] for o in outcomes] == [
        *(e["event_id"] for e in events),
        created["event_id"],
    ]
    assert therapists(committed_db) == {1, 2, 3}
    assert processed(committed_db) == 4
    assert transactions(committed_db) == 1


def test_a_message_that_fails_its_contract_is_left_to_its_own_run(committed_db: Engine) -> None:
    bad = f.therapist_upserted(22, email="praxis@weber.de\r\nBcc: alle@example.org")
    no_keyword: Item = (THERAPIST, str(uuid.uuid4()), (f.therapist_upserted(24),), {})

    outcomes = apply_batch(
        [
            item(THERAPIST, f.therapist_upserted(21)),
            item(THERAPIST, bad),
            no_keyword,
            item(THERAPIST, f.therapist_upserted(23)),
        ]
    )

    # Its own run validates it again and keeps it as a dead letter; the batch stores none.
    assert [o and o["result"] for o in outcomes] == ["applied", None, None, "applied"]
    assert therapists(committed_db) == {21, 23}
    assert letters(committed_db) == []
    assert transactions(committed_db) == 1


def test_a_message_its_applier_refuses_is_taken_out_and_the_rest_applied_together(
    committed_db: Engine,
) -> None:
    # A status change of a request nobody created: the applier raises, mid-batch.
    unknown = f.status_changed(9999, "in_progress")

    outcomes = apply_batch(
        [
            item(THERAPIST, f.therapist_upserted(31)),
            item(MATCHING, unknown),
            item(THERAPIST, f.therapist_upserted(32)),
        ]
    )

    assert [o and o["result"] for o in outcomes] == ["applied", None, "applied"]
    assert therapists(committed_db) == {31, 32}
    # The first attempt rolled back whole; the second committed both.
    assert transactions(committed_db) == 1
    assert processed(committed_db) == 2


def test_after_a_few_refused_messages_the_rest_runs_alone(committed_db: Engine) -> None:
    refused = [item(MATCHING, f.status_changed(9990 + n, "in_progress")) for n in range(3)]
    assert len(refused) == MAX_ATTEMPTS

    outcomes = apply_batch([*refused, item(THERAPIST, f.therapist_upserted(41))])

    # Every attempt took one message out; the last message was not tried again here.
    assert outcomes == [None] * 4
    assert processed(committed_db) == 0


def test_an_outage_leaves_every_message_to_its_own_run(
    committed_db: Engine,
    refusals: Refusals,  # noqa: F811 - the fixture imported above
) -> None:
    events = [f.therapist_upserted(n) for n in (51, 52, 53)]
    refusals.refuse(events[1]["event_id"], SERIALIZATION_FAILURE)

    outcomes = apply_batch([item(THERAPIST, e) for e in events])

    # A serialization failure says nothing of the message: all of them retry on their own.
    assert outcomes == [None, None, None]
    assert refusals.attempts() == 1
    assert processed(committed_db) == 0
    assert therapists(committed_db) == set()


def test_the_same_message_twice_in_a_batch_or_after_one_is_applied_once(
    committed_db: Engine,
) -> None:
    first = f.therapist_upserted(61, occurred_at=f.at(0), email="erste@praxis.de")
    again = f.therapist_upserted(61, occurred_at=f.at(0), email="zweite@praxis.de")
    again["event_id"] = first["event_id"]

    outcomes = apply_batch([item(THERAPIST, first), item(THERAPIST, again)])
    later = apply_batch([item(THERAPIST, first)])

    assert [o and o["result"] for o in outcomes] == ["applied", "duplicate"]
    assert [o and o["result"] for o in later] == ["duplicate"]
    current = therapist(committed_db, 61)
    assert current is not None
    assert current.email == "erste@praxis.de"
    assert processed(committed_db) == 1


# --- a real worker -----------------------------------------------------------------------

MESSAGES = 300


def full_queue(broker_url: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Publish MESSAGES therapist events (one twice, one against its contract, one its
    applier refuses) while no worker runs; the good ones, the bad one, the refused one."""
    good = [f.therapist_upserted(1000 + n) for n in range(MESSAGES - 3)]
    bad = f.therapist_upserted(2000, email="praxis@weber.de\r\nBcc: alle@example.org")
    refused = f.status_changed(2001, "in_progress")
    producer = other_service(broker_url)
    try:
        for n, event in enumerate(good):
            producer.send_task(THERAPIST, kwargs={"event": event})
            if n == 100:
                producer.send_task(THERAPIST, kwargs={"event": bad})
                producer.send_task(MATCHING, kwargs={"event": refused})
                producer.send_task(THERAPIST, kwargs={"event": good[50]})
    finally:
        producer.close()
    return good, bad, refused


def left_on_broker(broker_url: str) -> int:
    """Messages in the task queue, or taken and not acknowledged (Redis)."""
    if not is_rabbitmq(broker_url):
        client = redis.Redis.from_url(broker_url)
        return int(client.llen("celery")) + int(client.hlen("unacked"))
    queues = json.loads(
        rabbitmqctl(
            "list_queues", "-p", vhost_of(broker_url), "--formatter", "json", "name", "messages"
        )
    )
    return sum(int(queue["messages"]) for queue in queues if queue["name"] == "celery")


def received(worker: WorkerProcess) -> int:
    """Messages the worker took from the broker (Celery logs each as it takes it, before it
    goes to the pool or waits in a batch)."""
    return sum("] received" in line for line in worker.log().splitlines())


PROCESSES = 2  # WorkerProcess's --concurrency


def worker_behind_a_lock(
    engine: Engine, env: dict[str, str], log_path: Path, batch: int
) -> WorkerProcess:
    """A worker that took a batch's worth of messages while it could apply none.

    The table the messages write is locked while the worker starts: one message per
    process waits on the lock, the next ones (up to a batch) wait in the worker. Then the
    lock is released: they go to the pool as one full batch.
    """
    held = engine.connect()
    try:
        held.execute(text(f"LOCK TABLE {Therapist.__table__} IN EXCLUSIVE MODE"))
        worker = WorkerProcess(env, log_path)
        try:
            worker.wait_for(lambda: waiting_on_locks(engine) >= PROCESSES, timeout=60)
            waiting = batch if batch > 1 else 0
            worker.wait_for(lambda: received(worker) >= PROCESSES + waiting, timeout=60)
        except BaseException:
            worker.stop()
            raise
    finally:
        held.close()  # rolled back: the lock is released
    return worker


def largest_transaction(engine: Engine) -> int:
    """The most ``processed_messages`` rows one transaction wrote."""
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(
                    "SELECT max(rows) FROM (SELECT count(*) AS rows"
                    f" FROM {ProcessedMessage.__table__} GROUP BY xmin::text) AS t"
                )
            ).scalar_one()
        )


def outcome_lines(worker: WorkerProcess) -> list[str]:
    return [line for line in worker.log().splitlines() if " SUCCESS in " in line]


# How many batches form depends on the machine (10 on RabbitMQ, 46 to 106 on Redis
# here): the broker's deliveries race the pool. What does not depend on it is made
# certain: the table the messages write is locked while the worker starts, so the first
# messages (one per process) wait on it and the next ones wait in the worker, up to a
# batch; once it is released they go to the pool as one full batch, and no batch is
# larger. One by one it is one transaction per message.
@pytest.mark.parametrize("batch", ["50", "1"])
def test_a_full_queue_is_applied_in_batches_each_message_once(
    committed_db: Engine,
    committed_url: str,
    broker_url: str,
    tmp_path: Path,
    batch: str,
) -> None:
    size = int(batch)
    env = broker_environment(committed_url, broker_url, tmp_path / "var", COMMS_INBOUND_BATCH=batch)
    good, bad, refused = full_queue(broker_url)
    worker = worker_behind_a_lock(committed_db, env, tmp_path / "worker.log", size)
    try:
        worker.wait_for(lambda: processed(committed_db) >= len(good), timeout=120)
        worker.wait_for(lambda: len(letters(committed_db)) >= 2, timeout=60)
        # One outcome line per message: the duplicate's too, and the two dead letters'.
        worker.wait_for(lambda: len(outcome_lines(worker)) >= MESSAGES, timeout=60)
        worker.check_alive()
    finally:
        worker.stop()
    # Every message was acknowledged: none is left on the broker, nor given back to it.
    # (RabbitMQ's count follows the acknowledgements with a short lag: read until it
    # settles; a message given back at the worker's stop stays counted.)
    wait_for(
        lambda: left_on_broker(broker_url) == 0,
        timeout=20,
        interval=1,
        explain=lambda: f"{left_on_broker(broker_url)} messages left on the broker",
    )

    assert therapists(committed_db) == {event["payload"]["therapist_id"] for event in good}
    assert processed(committed_db) == len(good)
    assert {letter.message_id for letter in letters(committed_db)} == {
        bad["event_id"],
        refused["event_id"],
    }
    lines = outcome_lines(worker)
    assert len(lines) == MESSAGES, lines[-5:]
    assert sum(f"message_id={good[50]['event_id']}" in line for line in lines) == 2
    assert sum("result=duplicate" in line for line in lines) == 1
    written = transactions(committed_db)
    if size == 1:
        assert written == len(good)
    else:
        assert written < len(good)
    assert largest_transaction(committed_db) == size, f"{written} transactions"
    print(f"{len(good)} messages applied in {written} transactions (COMMS_INBOUND_BATCH={batch})")


def test_a_batch_handed_to_the_pool_shows_its_size_not_its_messages() -> None:
    # The pool logs what it is handed at DEBUG; a message's arguments hold patient data.
    created = f.request_created(71, diagnosis="BATCHMARK-diagnosis")
    shown = repr((Batch([item(MATCHING, created), item(THERAPIST, f.therapist_upserted(71))]),))

    assert "BATCHMARK" not in shown
    assert shown == "(<inbound batch of 2 messages>,)"


def test_with_a_result_backend_every_batched_message_has_its_result(
    committed_db: Engine, committed_url: str, broker_url: str, tmp_path: Path
) -> None:
    # The results in this module's Redis database, whichever the broker.
    backend = broker_url_of("redis", BROKER_SLOT)
    env = broker_environment(
        committed_url, broker_url, tmp_path / "var", COMMS_RESULT_BACKEND=backend
    )
    redis.Redis.from_url(backend).flushdb()
    producer = other_service(broker_url)
    producer.conf.result_backend = backend
    events = [f.therapist_upserted(3000 + n) for n in range(40)]
    try:
        sent = [producer.send_task(THERAPIST, kwargs={"event": event}) for event in events]
        worker = worker_behind_a_lock(committed_db, env, tmp_path / "worker.log", len(events) - 2)
        try:
            worker.wait_for(lambda: processed(committed_db) >= len(events), timeout=60)
            results = [result.get(timeout=30) for result in sent]
        finally:
            worker.stop()
    finally:
        producer.close()
        redis.Redis.from_url(backend).flushdb()

    assert [result["message_id"] for result in results] == [e["event_id"] for e in events]
    assert {result["result"] for result in results} == {"applied"}
    # Two alone (they waited on the lock), then the rest as one batch.
    assert largest_transaction(committed_db) == len(events) - PROCESSES


def publish_raw(broker_url: str, task_name: str, args: Any, kwargs: Any) -> str:
    """A task message (Celery's protocol 2) whose body holds ``args`` and ``kwargs`` as
    given: Celery's ``send_task`` refuses a kwargs that is not a mapping, a producer in
    another language need not."""
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": task_name, "id": task_id, "root_id": task_id}
    headers |= {"parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None}
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    with Connection(broker_url) as connection:
        connection.Producer().publish(
            [args, kwargs, embed],
            exchange="",
            routing_key="celery",
            headers=headers,
            serializer="json",
            correlation_id=task_id,
            delivery_mode=2,
        )
    return task_id


# A well-formed event inside each malformed call: it must not be applied.
INSIDE = f.therapist_upserted(3100)
MALFORMED = {
    "kwargs-a-string": ([], "event"),
    "args-a-number": (5, {"event": INSIDE}),
    "kwargs-pairs": ([], [["event", INSIDE]]),
}


@pytest.mark.parametrize("call", MALFORMED)
def test_a_malformed_call_is_a_dead_letter_and_stops_nothing(
    committed_db: Engine, committed_url: str, broker_url: str, tmp_path: Path, call: str
) -> None:
    args, kwargs = MALFORMED[call]
    env = broker_environment(committed_url, broker_url, tmp_path / "var")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    producer = other_service(broker_url)
    try:
        task_id = publish_raw(broker_url, THERAPIST, args, kwargs)
        producer.send_task(THERAPIST, kwargs={"event": f.therapist_upserted(3101)})
        worker.wait_for(lambda: therapist(committed_db, 3101), timeout=60)
        [letter] = worker.wait_for(lambda: letters(committed_db), timeout=30)
        worker.check_alive()
    finally:
        producer.close()
        worker.stop()

    assert letter.task_name == THERAPIST
    assert letter.message_id == task_id
    assert letter.reason.startswith("the message is not a valid task message")
    assert letter.payload == {"args": args, "kwargs": kwargs}
    assert therapist(committed_db, 3100) is None
    assert "Unrecoverable error" not in worker.log()
