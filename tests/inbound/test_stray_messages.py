"""Messages the worker cannot run are dead letters, never log lines with their body.

Celery's consumer logs "The full contents of the message body was: ..." and discards a
message whose task name it does not know (a producer's typo), one it cannot decode, one
without a task name and one in a content type it does not accept. Each such message may
hold a patient summary. Here they reach a real worker on the test Redis, published raw
as a producer's broken client would; each must end as a dead letter (task name, message
id, reason) whose body only the letter keeps, and the worker goes on.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.models import DeadLetter, DeadLetterStatus
from tests import factories as f
from tests.conftest import WorkerProcess, worker_environment
from tests.inbound.test_inbound_tasks import COMMS, THERAPIST, comms_json, therapist

MARKER = "STRAY-DIAGNOSIS-41c7"


def dead_letters(engine: Engine) -> list[DeadLetter]:
    with Session(engine) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def publish_raw(
    sender: Celery, body: bytes, headers: dict[str, Any], content_type: str = "application/json"
) -> None:
    """A message on the worker's queue exactly as given: no Celery client shapes it."""
    with sender.connection_for_write() as connection:
        connection.Producer().publish(
            body,
            exchange="",
            routing_key="celery",
            headers=headers,
            content_type=content_type,
            content_encoding="utf-8",
            serializer=None,
        )


def task_headers(name: str, task_id: str) -> dict[str, Any]:
    return {"lang": "py", "task": name, "id": task_id, "argsrepr": "()", "kwargsrepr": "{}"}


def test_a_message_for_an_unknown_task_is_a_dead_letter_and_its_body_is_not_logged(
    worker: WorkerProcess, committed_db: Engine, committed_url: str, sender: Celery
) -> None:
    event = f.patient_updated(4100, diagnosis=MARKER, current_complaints=MARKER)
    typo = "comms.handle_patient_events"
    result = sender.send_task(typo, kwargs={"event": event})

    [letter] = worker.wait_for(lambda: dead_letters(committed_db))
    assert letter.task_name == typo
    assert letter.message_id == event["event_id"]
    assert letter.status is DeadLetterStatus.PENDING
    assert letter.reason == f"unknown task: no task of this name (Celery task id {result.id})"
    assert letter.payload == {"args": [], "kwargs": {"event": event}}

    # The worker goes on with the next message.
    sender.send_task(THERAPIST, kwargs={"event": f.therapist_upserted(4101)})
    worker.wait_for(lambda: therapist(committed_db, 4101))
    log = worker.log()
    assert MARKER not in log
    assert "full contents of the message body" not in log
    assert f"dead letter {letter.id} for an unknown task {typo}" in log

    # The operator sees it listed; a replay refuses it, naming why.
    [listed] = comms_json(committed_url, "dead-letters", "list")
    assert listed["task_name"] == typo
    assert MARKER not in json.dumps(listed)
    replayed = subprocess.run(
        [COMMS, "dead-letters", "replay", str(letter.id)],
        env=worker_environment(COMMS_DATABASE_URL=committed_url),
        capture_output=True,
        text=True,
        check=False,
    )
    assert replayed.returncode == 1
    assert f"{typo} is no task of this service" in replayed.stderr
    [kept] = dead_letters(committed_db)
    assert kept.status is DeadLetterStatus.PENDING


def test_messages_that_cannot_be_decoded_or_named_are_dead_letters_without_logged_bodies(
    worker: WorkerProcess, committed_db: Engine, sender: Celery
) -> None:
    broken_json = f'[[], {{"event": {{"payload": {{"diagnosis": "{MARKER}"'.encode()
    undecodable_id = str(uuid.uuid4())
    publish_raw(sender, broken_json, task_headers(THERAPIST, undecodable_id))
    # No task header: neither protocol 2 nor a protocol 1 body naming a task.
    publish_raw(sender, json.dumps({"diagnosis": MARKER}).encode(), {"lang": "py"})
    # A content type the worker refuses (pickle would run code).
    refused_id = str(uuid.uuid4())
    publish_raw(
        sender,
        f"(lp0\nS'{MARKER}'\np1\na.".encode(),
        task_headers(THERAPIST, refused_id),
        content_type="application/x-python-serialize",
    )
    sender.send_task(THERAPIST, kwargs={"event": f.therapist_upserted(4102)})

    worker.wait_for(lambda: therapist(committed_db, 4102))
    letters = worker.wait_for(
        lambda: len(dead_letters(committed_db)) == 3 and dead_letters(committed_db)
    )
    by_reason = {letter.reason.split(":")[0]: letter for letter in letters}
    assert set(by_reason) == {
        "the message could not be decoded",
        "the message names no task",
        "the message's content type is not accepted",
    }, [letter.reason for letter in letters]
    undecodable = by_reason["the message could not be decoded"]
    assert undecodable.task_name == THERAPIST
    assert undecodable.message_id == undecodable_id
    assert undecodable.payload["undecoded_body"] == broken_json.decode()
    assert by_reason["the message's content type is not accepted"].message_id == refused_id
    for letter in letters:
        assert MARKER not in letter.reason
    log = worker.log()
    assert MARKER not in log
    assert "full contents of the message" not in log
