"""``task_runs``: only runs that beat started move a scheduled task's clock.

A ``comms.send_email`` started after a command (``send_email_after_commit``), by the
batch's chain or by an operator is the same task, but not the beat's run: counting it
would make a stopped beat look alive in ``comms status``.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery.beat import ScheduleEntry, Scheduler
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from comms_tasks.app import app
from comms_tasks.emails.tasks import send_email
from comms_tasks.ops.reports import status_snapshot
from schedules import beat_schedule
from tests.conftest import WorkerProcess, wait_for


def last_run(engine: Engine, task_name: str) -> dict[str, Any]:
    with Session(engine) as session:
        runs: dict[str, dict[str, Any]] = status_snapshot(session)["last_runs"]
    return runs[task_name]


def test_a_send_not_started_by_beat_does_not_move_the_clock(committed_db: Engine) -> None:
    # What send_email_after_commit and the batch's chain run: the task, no beat involved.
    assert send_email.apply().successful()
    assert last_run(committed_db, "comms.send_email")["last_state"] is None
    options = beat_schedule["send-email"].get("options", {})
    assert send_email.apply(headers=options.get("headers")).successful()
    assert last_run(committed_db, "comms.send_email")["last_state"] == "SUCCESS"


@pytest.mark.parametrize("name", sorted(beat_schedule))
def test_every_beat_entry_marks_its_runs(name: str) -> None:
    from comms_tasks.worker.task_runs import started_by_beat

    headers = beat_schedule[name].get("options", {}).get("headers")
    task = app.tasks[beat_schedule[name]["task"]]
    task.push_request(headers=headers)
    try:
        assert started_by_beat(task)
    finally:
        task.pop_request()


def test_through_a_real_worker_only_the_beat_entry_counts(
    committed_db: Engine, worker_broker_url: str, worker: WorkerProcess
) -> None:
    with app.connection_for_write(worker_broker_url) as connection:
        done = worker.log().count("comms.send_email[")
        # Started like send_email_after_commit starts it.
        send_email.apply_async(connection=connection)
        wait_for(lambda: worker.log().count("comms.send_email[") >= done + 2, explain=worker.tail)
        assert last_run(committed_db, "comms.send_email")["last_state"] is None
        # What beat does with its entry (the scheduler's own apply_async).
        entry = ScheduleEntry(name="send-email", app=app, **beat_schedule["send-email"])
        scheduler = Scheduler(app, lazy=True)
        with connection.Producer() as producer:
            scheduler.apply_async(entry, producer=producer, advance=False)
        wait_for(
            lambda: last_run(committed_db, "comms.send_email")["last_state"] == "SUCCESS",
            explain=worker.tail,
        )
