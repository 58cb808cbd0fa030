"""No inbound message is ever dropped: it is applied, or it ends as a dead letter.

Only outages (a lost connection, a serialization failure, a deadlock) are retried; any
other error is a dead letter at once, and an outage that outlives the retries is one too,
with the exception's class as the reason and the message kept for ``comms dead-letters
replay``. The failures are real: a trigger in the test database refuses the
``processed_messages`` row of chosen messages with a chosen SQLSTATE, which every inbound
task writes before it applies anything.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from comms_tasks.app import app
from comms_tasks.appliers import APPLIERS
from comms_tasks.contracts import COMMANDS, INBOUND_EVENTS
from comms_tasks.db import make_engine
from comms_tasks.inbound import failures
from comms_tasks.inbound.runner import MAX_TRANSIENT_RETRIES
from comms_tasks.models import DeadLetter, DeadLetterStatus
from tests import factories as f
from tests.conftest import WorkerProcess, free_port, worker_environment
from tests.contracts.test_inbound_contracts import example_message
from tests.inbound.test_inbound_tasks import COMMS, THERAPIST, comms_json, send, therapist

SETUP = """
CREATE TABLE IF NOT EXISTS public.test_refusals (message_id text PRIMARY KEY, sqlstate text);
CREATE SEQUENCE IF NOT EXISTS public.test_refusal_attempts;
CREATE OR REPLACE FUNCTION public.test_refuse() RETURNS trigger AS $$
DECLARE code text;
BEGIN
  SELECT sqlstate INTO code FROM public.test_refusals WHERE message_id = NEW.message_id;
  IF code IS NOT NULL THEN
    PERFORM nextval('public.test_refusal_attempts');
    RAISE EXCEPTION 'refused by the test' USING ERRCODE = code;
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS test_refuse ON communication_service.processed_messages;
CREATE TRIGGER test_refuse BEFORE INSERT ON communication_service.processed_messages
  FOR EACH ROW EXECUTE FUNCTION public.test_refuse();
"""
TEARDOWN = """
DROP TRIGGER IF EXISTS test_refuse ON communication_service.processed_messages;
DROP FUNCTION IF EXISTS public.test_refuse();
DROP TABLE IF EXISTS public.test_refusals;
DROP SEQUENCE IF EXISTS public.test_refusal_attempts;
"""
DATA_EXCEPTION = "22023"  # invalid_parameter_value: a DataError
SERIALIZATION_FAILURE = "40001"
DEADLOCK = "40P01"
UNIQUE_VIOLATION = "23505"


class Refusals:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def refuse(self, message_id: str, sqlstate: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                text("INSERT INTO public.test_refusals VALUES (:id, :code)"),
                {"id": message_id, "code": sqlstate},
            )

    def allow(self, message_id: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                text("DELETE FROM public.test_refusals WHERE message_id = :id"), {"id": message_id}
            )

    def attempts(self) -> int:
        with self.engine.begin() as connection:
            row = connection.execute(
                text("SELECT last_value, is_called FROM public.test_refusal_attempts")
            ).one()
            return int(row.last_value) if row.is_called else 0


@pytest.fixture
def refusals(committed_db: Engine) -> Iterator[Refusals]:
    with committed_db.begin() as connection:
        connection.execute(text(TEARDOWN))
        connection.execute(text(SETUP))
    yield Refusals(committed_db)
    with committed_db.begin() as connection:
        connection.execute(text(TEARDOWN))


def dead_letters(engine: Engine) -> list[DeadLetter]:
    with Session(engine) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def message_id_of(message: dict[str, Any]) -> str:
    return str(message.get("event_id") or message["command_id"])


def argument_of(task_name: str) -> str:
    return "event" if task_name in INBOUND_EVENTS else "command"


INBOUND_TASKS = [*INBOUND_EVENTS, *COMMANDS]


def test_the_seven_inbound_tasks_are_the_ones_that_can_be_replayed() -> None:
    assert sorted(INBOUND_TASKS) == sorted(APPLIERS)
    assert len(INBOUND_TASKS) == 7
    for name in INBOUND_TASKS:
        assert name in app.tasks


@pytest.mark.parametrize("task_name", INBOUND_TASKS)
def test_every_inbound_task_dead_letters_a_database_error_that_is_not_an_outage(
    refusals: Refusals, committed_db: Engine, task_name: str
) -> None:
    message = example_message(task_name)
    refusals.refuse(message_id_of(message), DATA_EXCEPTION)

    result = app.tasks[task_name].apply(kwargs={argument_of(task_name): message})

    assert result.successful(), result.traceback
    assert refusals.attempts() == 1  # not retried
    [letter] = dead_letters(committed_db)
    assert letter.task_name == task_name
    assert letter.message_id == message_id_of(message)
    assert letter.reason == "could not be applied: DataError (InvalidParameterValue)"
    assert letter.payload == message
    assert letter.status is DeadLetterStatus.PENDING
    assert result.result["result"] == "dead_letter"


@pytest.mark.parametrize("sqlstate", [SERIALIZATION_FAILURE, DEADLOCK])
def test_an_outage_that_outlives_the_retries_ends_as_a_dead_letter(
    refusals: Refusals, committed_db: Engine, sqlstate: str
) -> None:
    event = f.therapist_upserted(7002)
    refusals.refuse(event["event_id"], sqlstate)

    # Run eagerly: each retry runs at once, without its backoff.
    result = app.tasks[THERAPIST].apply(kwargs={"event": event})

    assert result.successful(), result.traceback
    assert refusals.attempts() == MAX_TRANSIENT_RETRIES + 1
    [letter] = dead_letters(committed_db)
    assert letter.message_id == event["event_id"]
    assert letter.reason.startswith(f"could not be applied after {MAX_TRANSIENT_RETRIES} retries: ")
    assert "OperationalError" in letter.reason


def test_a_persistent_integrity_error_ends_as_a_dead_letter(
    refusals: Refusals, committed_db: Engine
) -> None:
    event = f.therapist_upserted(7004)
    refusals.refuse(event["event_id"], UNIQUE_VIOLATION)

    result = app.tasks[THERAPIST].apply(kwargs={"event": event})

    assert result.successful(), result.traceback
    assert 1 < refusals.attempts() <= MAX_TRANSIENT_RETRIES + 1
    [letter] = dead_letters(committed_db)
    assert "IntegrityError (UniqueViolation)" in letter.reason


def test_a_non_outage_error_from_another_process_is_a_dead_letter_and_replays(
    worker: WorkerProcess,
    refusals: Refusals,
    committed_db: Engine,
    committed_url: str,
    sender: Celery,
) -> None:
    event = f.therapist_upserted(7001)
    refusals.refuse(event["event_id"], DATA_EXCEPTION)

    send(sender, THERAPIST, event)

    [letter] = worker.wait_for(lambda: dead_letters(committed_db))
    assert letter.message_id == event["event_id"]
    assert letter.reason == "could not be applied: DataError (InvalidParameterValue)"
    # Not retried: tried once in the worker's batch (inbound.batch), which left it to its
    # own run, and once in that run, which kept it as a dead letter.
    assert refusals.attempts() == 2
    assert therapist(committed_db, 7001) is None

    refusals.allow(event["event_id"])
    replayed = comms_json(committed_url, "dead-letters", "replay", str(letter.id))
    assert replayed[0]["result"] == "applied"
    assert therapist(committed_db, 7001) is not None


def test_an_outage_that_ends_is_retried_and_applied_without_a_dead_letter(
    worker: WorkerProcess, refusals: Refusals, committed_db: Engine, sender: Celery
) -> None:
    event = f.therapist_upserted(7003)
    refusals.refuse(event["event_id"], SERIALIZATION_FAILURE)

    send(sender, THERAPIST, event)
    worker.wait_for(lambda: refusals.attempts() >= 1)
    refusals.allow(event["event_id"])

    worker.wait_for(lambda: therapist(committed_db, 7003), timeout=60)
    assert dead_letters(committed_db) == []


def test_a_replay_that_fails_again_keeps_the_letter_with_the_new_reason(
    refusals: Refusals, committed_db: Engine, committed_url: str
) -> None:
    event = f.therapist_upserted(7005)
    refusals.refuse(event["event_id"], DATA_EXCEPTION)
    app.tasks[THERAPIST].apply(kwargs={"event": event})
    [letter] = dead_letters(committed_db)

    replay = subprocess.run(
        [COMMS, "dead-letters", "replay", str(letter.id), "--json"],
        env=worker_environment(COMMS_DATABASE_URL=committed_url),
        capture_output=True,
        text=True,
    )

    assert replay.returncode == 1, replay.stderr
    assert json.loads(replay.stdout)[0]["result"] == "dead_letter"
    [again] = dead_letters(committed_db)
    assert again.status is DeadLetterStatus.PENDING
    assert again.replay_count == 1
    assert again.reason == "could not be applied: DataError (InvalidParameterValue)"


# --- what counts as an outage ----------------------------------------------------------


def real_error(engine: Engine, statement: str) -> Exception:
    try:
        with engine.begin() as connection:
            connection.execute(text(statement))
    except Exception as exc:
        return exc
    raise AssertionError(f"{statement} did not fail")


def test_only_outages_are_transient(committed_db: Engine) -> None:
    def raising(sqlstate: str) -> str:
        return f"DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '{sqlstate}'; END $$"

    unreachable = make_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nowhere")
    try:
        refused = real_error(unreachable, "SELECT 1")
    finally:
        unreachable.dispose()
    assert isinstance(refused, OperationalError)
    assert failures.is_transient(refused)
    assert failures.is_transient(real_error(committed_db, raising(SERIALIZATION_FAILURE)))
    assert failures.is_transient(real_error(committed_db, raising(DEADLOCK)))
    assert failures.is_transient(real_error(committed_db, raising("57P01")))  # admin shutdown

    division = real_error(committed_db, "SELECT 1 / 0")
    assert isinstance(division, DataError)
    assert not failures.is_transient(division)
    assert not failures.is_transient(real_error(committed_db, raising(DATA_EXCEPTION)))
    duplicate = real_error(committed_db, raising(UNIQUE_VIOLATION))
    assert isinstance(duplicate, IntegrityError)
    assert not failures.is_transient(duplicate)
    assert not failures.is_transient(OverflowError("date value out of range"))
    assert not failures.is_transient(ValueError(str(uuid.uuid4())))


@pytest.mark.parametrize(
    "change",
    [
        {"last_name": "We\ud800ber"},
        {"phone": "\udcff030 123"},
        {"title\udc80": "Dr."},
    ],
    ids=["name", "phone", "key"],
)
def test_a_message_with_a_lone_surrogate_is_kept_as_a_dead_letter(
    committed_db: Engine, change: dict[str, str]
) -> None:
    # JSON may carry "\\ud800" escapes that are no character; PostgreSQL cannot store
    # them, so the dead letter keeps U+FFFD in their place, as it does for NUL.
    event = f.therapist_upserted(7010)
    event["payload"].update(change)

    result = app.tasks[THERAPIST].apply(kwargs={"event": event})

    assert result.successful(), result.traceback
    [letter] = dead_letters(committed_db)
    assert letter.message_id == event["event_id"]
    assert "\ufffd" in json.dumps(letter.payload, ensure_ascii=False)


def test_a_message_whose_dead_letter_cannot_be_stored_is_kept_as_a_minimal_letter(
    committed_db: Engine,
) -> None:
    # Nothing in it can be written as JSON (a set, which only a direct call can pass):
    # the full letter fails for good, a letter naming the task, id and cause is kept.
    event = f.therapist_upserted(7020)
    event["payload"]["extra"] = {1, 2}

    result = app.tasks[THERAPIST].apply(kwargs={"event": event})

    assert result.successful(), result.traceback
    assert result.result["result"] == "dead_letter"
    [letter] = dead_letters(committed_db)
    assert result.result["dead_letter_id"] == letter.id
    assert letter.task_name == THERAPIST
    assert letter.message_id == event["event_id"]
    assert letter.reason.startswith("the message could not be stored: ")
    assert "TypeError" in letter.reason
    assert letter.status is DeadLetterStatus.PENDING
    assert "Weber" not in json.dumps(letter.payload)

    # Delivered again, it counts on the same letter.
    again = app.tasks[THERAPIST].apply(kwargs={"event": event})
    assert again.result["dead_letter_id"] == letter.id
