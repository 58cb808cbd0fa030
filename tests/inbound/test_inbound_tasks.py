"""Inbound messages through a real broker (Redis) and a real worker, sent by task name."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from comms_tasks.appliers import APPLIERS
from comms_tasks.inbound.inbox import handle
from comms_tasks.models import DeadLetter, PlacementRequest, ProcessedMessage, Therapist
from tests import factories as f
from tests.conftest import WorkerProcess, count_rows, wait_for, worker_environment
from tests.contracts import test_inbound_contracts as contract_examples

THERAPIST = "comms.handle_therapist_event"
MATCHING = "comms.handle_matching_event"
COMMS = str(Path(sys.executable).parent / "comms")


def send(sender: Celery, task: str, event: dict[str, Any]) -> None:
    sender.send_task(task, kwargs={"event": event})


def therapist(engine: Engine, therapist_id: int) -> Therapist | None:
    with Session(engine) as session:
        return session.get(Therapist, therapist_id)


def placement_request(engine: Engine, request_id: int) -> PlacementRequest | None:
    with Session(engine) as session:
        return session.get(PlacementRequest, request_id)


def comms_json(committed_url: str, *args: str) -> Any:
    result = subprocess.run(
        [COMMS, *args, "--json"],
        env=worker_environment(COMMS_DATABASE_URL=committed_url),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_a_bad_message_from_another_process_becomes_a_dead_letter_and_the_next_applies(
    worker: WorkerProcess, committed_db: Engine, committed_url: str, worker_broker_url: str
) -> None:
    bad = f.therapist_upserted(21, email="praxis@weber.de\r\nBcc: alle@example.org")
    good = f.therapist_upserted(22)
    script = textwrap.dedent(
        f"""
        from celery import Celery
        app = Celery("matching-service", broker={worker_broker_url!r})
        app.send_task({THERAPIST!r}, kwargs={{"event": {bad!r}}})
        app.send_task({THERAPIST!r}, kwargs={{"event": {good!r}}})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=worker_environment())

    worker.wait_for(lambda: therapist(committed_db, 22))
    letters = wait_for(lambda: comms_json(committed_url, "dead-letters", "list"))
    assert len(letters) == 1
    assert letters[0]["task_name"] == THERAPIST
    assert letters[0]["message_id"] == bad["event_id"]
    assert letters[0]["reason"] == "event.payload.email: must not contain a line break"
    assert therapist(committed_db, 21) is None


def test_the_same_event_twice_is_applied_once(
    worker: WorkerProcess, committed_db: Engine, sender: Celery
) -> None:
    first = f.therapist_upserted(31, occurred_at=f.at(0), email="erste@praxis.de")
    # Same time, other content: had the duplicate been applied again, it would win.
    second = f.therapist_upserted(31, occurred_at=f.at(0), email="zweite@praxis.de")
    send(sender, THERAPIST, first)
    wait_for(lambda: therapist(committed_db, 31))
    send(sender, THERAPIST, second)
    wait_for(lambda: (t := therapist(committed_db, 31)) and t.email == "zweite@praxis.de")
    send(sender, THERAPIST, first)
    duplicate = f"result=duplicate message_id={first['event_id']}"
    wait_for(lambda: duplicate in worker.log())
    current = therapist(committed_db, 31)
    assert current is not None
    assert current.email == "zweite@praxis.de"


def test_an_older_event_after_a_newer_one_changes_nothing(
    worker: WorkerProcess, committed_db: Engine, sender: Celery
) -> None:
    send(sender, THERAPIST, f.therapist_upserted(41, occurred_at=f.at(10), status="blocked"))
    wait_for(lambda: therapist(committed_db, 41))
    send(sender, THERAPIST, f.therapist_upserted(41, occurred_at=f.at(0), status="active"))
    send(sender, THERAPIST, f.therapist_upserted(42))
    # The two go to the pool's two processes at once: either may commit first.
    wait_for(
        lambda: count_rows(committed_db, ProcessedMessage) >= 3 and therapist(committed_db, 42)
    )
    assert count_rows(committed_db, ProcessedMessage) == 3
    current = therapist(committed_db, 41)
    assert current is not None
    assert current.status.value == "blocked"
    assert current.last_event_at == f.at(10)


def test_one_event_delivered_many_times_at_once_is_applied_once(
    worker: WorkerProcess, committed_db: Engine, sender: Celery
) -> None:
    event = f.request_created(51, patient_id=5100)
    for _ in range(20):
        send(sender, MATCHING, event)
    wait_for(lambda: worker.log().count(event["event_id"]) >= 20, timeout=60)
    with Session(committed_db) as session:
        rows = session.scalars(
            select(ProcessedMessage).where(ProcessedMessage.message_id == event["event_id"])
        ).all()
        assert len(rows) == 1
        assert session.get(PlacementRequest, 51) is not None
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 0


def test_a_call_without_the_event_keyword_is_kept_as_a_dead_letter(
    worker: WorkerProcess, committed_db: Engine, sender: Celery
) -> None:
    sender.send_task(THERAPIST, kwargs={"payload": f.therapist_upserted(61)})
    sender.send_task(THERAPIST, args=[f.therapist_upserted(62)])

    def letters() -> list[DeadLetter]:
        with Session(committed_db) as session:
            return list(session.scalars(select(DeadLetter)))

    found = wait_for(lambda: len(letters()) == 2 and letters())
    assert {letter.reason for letter in found} == {
        "arguments: expected exactly one keyword argument 'event'"
    }


def test_a_dead_letter_is_replayed_once_its_cause_is_gone(
    worker: WorkerProcess, committed_db: Engine, committed_url: str, sender: Celery
) -> None:
    # The status change overtakes the creation of its request.
    send(sender, MATCHING, f.status_changed(71, "in_progress", occurred_at=f.at(5)))
    letters = wait_for(lambda: comms_json(committed_url, "dead-letters", "list"))
    assert letters[0]["reason"] == "event.payload.placement_request_id: unknown placement request"
    send(sender, MATCHING, f.request_created(71, occurred_at=f.at(0)))
    wait_for(lambda: placement_request(committed_db, 71))

    replayed = comms_json(committed_url, "dead-letters", "replay", str(letters[0]["id"]))
    assert replayed[0]["result"] == "applied"
    with Session(committed_db) as session:
        request = session.get(PlacementRequest, 71)
        assert request is not None
        assert request.status.value == "in_progress"
    assert comms_json(committed_url, "dead-letters", "list") == []
    history = comms_json(committed_url, "dead-letters", "list", "--all")
    assert history[0]["status"] == "replayed"
    assert history[0]["replay_count"] == 1


def test_a_status_change_of_an_unknown_request_is_a_dead_letter_with_its_event_id(
    worker: WorkerProcess, committed_db: Engine, committed_url: str, sender: Celery
) -> None:
    event = f.status_changed(81, "in_progress", occurred_at=f.at(5))

    send(sender, MATCHING, event)

    letters = worker.wait_for(lambda: comms_json(committed_url, "dead-letters", "list"))
    assert letters[0]["message_id"] == event["event_id"]
    assert f"(message {event['event_id']})" in worker.log()
    assert "(message None)" not in worker.log()


REJECTED_BY_THE_APPLIER = [
    pytest.param(MATCHING, lambda: f.status_changed(91, "in_progress"), id="status-changed"),
    pytest.param(MATCHING, lambda: f.request_cancelled(92), id="cancelled"),
    pytest.param(
        "comms.record_email_response",
        lambda: contract_examples.email_response(),
        id="email-response",
    ),
    pytest.param(
        "comms.record_call_outcome", lambda: contract_examples.call_outcome(), id="call-outcome"
    ),
    pytest.param("comms.queue_email", lambda: contract_examples.queue_email(), id="queue-email"),
    pytest.param(
        "comms.schedule_call", lambda: contract_examples.schedule_call(), id="schedule-call"
    ),
]


@pytest.mark.parametrize(("task_name", "make"), REJECTED_BY_THE_APPLIER)
def test_every_dead_letter_of_a_well_formed_message_carries_its_id(
    committed_db: Engine, task_name: str, make: Callable[[], dict[str, Any]]
) -> None:
    # Nothing is known yet: each message names an unknown request, email, call or therapist.
    raw = make()

    outcome = handle(task_name, raw, APPLIERS[task_name])

    assert outcome.result == "dead_letter", outcome
    expected = raw.get("event_id") or raw["command_id"]
    assert outcome.message_id == expected
    with Session(committed_db) as session:
        letter = session.get(DeadLetter, outcome.dead_letter_id)
        assert letter is not None
        assert letter.message_id == expected
