"""A message that kills its worker process ends as a dead letter after a few deliveries.

With ``task_reject_on_worker_lost`` a message whose pool process died is given back to
the broker and delivered again, forever if it kills every process that runs it. A real
prefork worker (on Redis, then on RabbitMQ) runs a real inbound task; ``tests.worker_crash_hook``
makes the process die (``os._exit``) where it would apply one chosen message, as an out
of memory kill or a segfault would. Ordinary retries (a database outage, here a trigger
refusing the message with a serialization failure) are not deliveries that killed
anything, however many there are.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.models import DeadLetter, DeadLetterStatus
from comms_tasks.worker.deliveries import MAX_DELIVERIES
from tests import factories as f
from tests.conftest import WorkerProcess, broker_environment, other_service
from tests.inbound.test_inbound_failures import (  # noqa: F401 - the fixture, used by name
    SERIALIZATION_FAILURE,
    Refusals,
    refusals,
)
from tests.inbound.test_inbound_tasks import THERAPIST, comms_json, therapist
from tests.worker_crash_hook import CRASH_NAME

BROKER_SLOT = 2  # the broker_url fixture: this module's broker, on each kind


def dead_letters(engine: Engine) -> list[DeadLetter]:
    with Session(engine) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def test_a_message_that_kills_its_worker_is_a_dead_letter_after_a_few_deliveries(
    committed_db: Engine,
    committed_url: str,
    broker_url: str,
    refusals: Refusals,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    crashes = tmp_path / "crashes"
    crashes.touch()
    env = broker_environment(
        committed_url, broker_url, tmp_path / "var", CRASH_HOOK_LOG=str(crashes)
    )
    worker = WorkerProcess(env, tmp_path / "worker.log", "--include", "tests.worker_crash_hook")
    producer: Celery = other_service(broker_url)
    try:
        killer = f.therapist_upserted(5100, last_name=CRASH_NAME)
        # Retried more often than the limit, for an outage: applied in the end.
        retried = f.therapist_upserted(5101)
        refusals.refuse(retried["event_id"], SERIALIZATION_FAILURE)
        producer.send_task(THERAPIST, kwargs={"event": killer})
        producer.send_task(THERAPIST, kwargs={"event": retried})
        worker.wait_for(lambda: refusals.attempts() > MAX_DELIVERIES + 1, timeout=60)
        refusals.allow(retried["event_id"])

        [letter] = worker.wait_for(lambda: dead_letters(committed_db), timeout=90)
        worker.wait_for(lambda: therapist(committed_db, 5101), timeout=60)
        # The worker goes on with the next messages.
        producer.send_task(THERAPIST, kwargs={"event": f.therapist_upserted(5102)})
        worker.wait_for(lambda: therapist(committed_db, 5102))
        worker.check_alive()
    finally:
        producer.close()
        worker.stop()

    # Once in a batch of the worker's (uncounted: the batch's messages then run alone),
    # then MAX_DELIVERIES times alone, each start counted.
    assert len(crashes.read_text().split()) == MAX_DELIVERIES + 1
    assert letter.task_name == THERAPIST
    assert letter.message_id == killer["event_id"]
    assert letter.status is DeadLetterStatus.PENDING
    assert letter.reason == f"killed its worker process {MAX_DELIVERIES} times: not run again"
    assert letter.payload == killer
    assert len(dead_letters(committed_db)) == 1
    assert therapist(committed_db, 5100) is None

    # Replayed in `comms` (without the hook: the cause is fixed), it applies.
    [replayed] = comms_json(committed_url, "dead-letters", "replay", str(letter.id))
    assert replayed["result"] == "applied"
    assert therapist(committed_db, 5100) is not None
