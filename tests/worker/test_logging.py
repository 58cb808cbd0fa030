"""Logs: one JSON line per task outcome, with ids and duration, never patient data."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from comms_tasks.models import Patient
from tests import factories as f
from tests.conftest import WorkerProcess, broker_environment, wait_for

MARKER = "LOGMARK-9b2e"
BROKER_SLOT = 11  # the broker_url fixture: this module's broker, on each kind


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_json_logs_name_task_ids_and_duration_and_no_patient_data(
    broker_url: str, committed_db: Engine, committed_url: str, tmp_path: Path
) -> None:
    env = broker_environment(
        committed_url,
        broker_url,
        tmp_path / "var",
        COMMS_LOG_FORMAT="json",
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    app = Celery("matching-service", broker=broker_url, set_as_current=False)
    summary = {field: MARKER for field in ("diagnosis", "gender", "current_complaints")}
    good = f.request_created(91, patient_id=9100, **summary)
    bad = f.request_created(92, patient_id=9200, **summary)
    bad["payload"]["therapist_id"] = "not a number"
    sent_at = time.monotonic()
    try:
        app.send_task("comms.handle_matching_event", kwargs={"event": good})
        app.send_task("comms.handle_matching_event", kwargs={"event": bad})

        def applied() -> bool:
            with Session(committed_db) as session:
                return session.get(Patient, 9100) is not None

        wait_for(applied)
        wait_for(lambda: bad["event_id"] in worker.log())
        # A task ran within the time between sending and seeing its outcome.
        window_ms = (time.monotonic() - sent_at) * 1000
    finally:
        worker.stop()
        app.close()
    log = worker.log()
    assert MARKER not in log
    outcomes = [
        line for line in json_lines(log) if line.get("task") == "comms.handle_matching_event"
    ]
    by_message = {line["ids"].get("message_id"): line for line in outcomes}
    assert by_message[good["event_id"]]["ids"]["result"] == "applied"
    assert by_message[good["event_id"]]["state"] == "SUCCESS"
    for line in outcomes:
        duration = line["duration_ms"]
        assert isinstance(duration, float) and 0 < duration < window_ms, line
    assert by_message[good["event_id"]]["task_id"]
    assert by_message[bad["event_id"]]["ids"]["result"] == "dead_letter"
    assert by_message[bad["event_id"]]["ids"]["dead_letter_id"] >= 1
    # One outcome line per task.
    assert len(outcomes) == 2
