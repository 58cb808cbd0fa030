"""The whole pipeline with planted markers in every patient field: the markers reach the
therapist's email and nothing else — not the worker's log, not an event, not a dead
letter's reason, not a task's result."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.models import DeadLetter, Email, EmailStatus, OutboxEvent, PlacementRequest
from tests import factories as f
from tests.conftest import WorkerProcess, broker_environment, count_rows
from tests.smtp import SmtpSink

BROKER_SLOT = 10  # the broker_url fixture: this module's broker, on each kind
MARK = "PIPEMARK"
SUMMARY_FIELDS = (
    "diagnosis",
    "gender",
    "time_availability",
    "symptoms_since",
    "therapy_experience",
    "current_complaints",
)


def marked_summary(tag: str) -> dict[str, Any]:
    return {field: f"{MARK}-{tag}-{field}" for field in SUMMARY_FIELDS}


def test_patient_data_goes_into_the_email_and_nowhere_else(
    broker_url: str, committed_db: Engine, committed_url: str, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    env = broker_environment(
        committed_url,
        broker_url,
        tmp_path / "var",
        **smtp_sink.worker_settings(),
        COMMS_LOG_LEVEL="DEBUG",
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    app = Celery("other-services", broker=broker_url, set_as_current=False)
    try:
        app.send_task("comms.handle_therapist_event", kwargs={"event": f.therapist_upserted(1)})
        for request_id in (1, 2, 3):
            event = f.request_created(
                request_id,
                patient_id=100 + request_id,
                therapist_id=1,
                **marked_summary(f"r{request_id}"),
            )
            app.send_task("comms.handle_matching_event", kwargs={"event": event})
        broken = f.request_created(4, patient_id=104, **marked_summary("broken"))
        broken["payload"]["patient"]["open_to_group_therapy"] = f"{MARK}-not-a-bool"
        broken["payload"]["patient"]["hobby"] = f"{MARK}-unknown-field"
        app.send_task("comms.handle_matching_event", kwargs={"event": broken})

        def requests_applied() -> bool:
            return (
                count_rows(committed_db, PlacementRequest) == 3
                and count_rows(committed_db, DeadLetter) == 1
            )

        worker.wait_for(requests_applied)
        app.send_task("comms.batch_requests")
        worker.wait_for(lambda: len(smtp_sink.accepted) == 1)

        def email_sent() -> Email | None:
            # The recorder thread commits the result just after the sink accepted
            # the message (docs/reliability.md): the status follows by a moment.
            with Session(committed_db) as session:
                email = session.scalars(select(Email)).one()
            return email if email.status is EmailStatus.SENT else None

        email = worker.wait_for(email_sent)
        response = {
            "command_id": str(uuid.uuid4()),
            "email_id": email.id,
            "received_at": "2026-12-01T10:00:00+01:00",
            "content": f"{MARK}-reply: gern für die Patientin mit {MARK}-r1-diagnosis",
            "outcomes": [
                {"placement_request_id": 1, "outcome": "accepted", "notes": f"{MARK}-note"}
            ],
        }
        app.send_task("comms.record_email_response", kwargs={"command": response})
        worker.wait_for(lambda: len(smtp_sink.accepted) == 2)
        app.send_task("comms.relay_outbox")

        def relayed() -> bool:
            return not count_rows(committed_db, OutboxEvent, OutboxEvent.published_at.is_(None))

        worker.wait_for(relayed)
    finally:
        worker.stop()
        app.close()

    # The therapist got the summaries: the markers were really in play.
    body = smtp_sink.accepted[0].get_body(("plain",))
    assert body is not None and f"{MARK}-r1-diagnosis" in body.get_content()

    log = worker.log()
    assert "comms.batch_requests" in log and "comms.send_email" in log
    assert MARK not in log
    with Session(committed_db) as session:
        envelopes = [row.envelope for row in session.scalars(select(OutboxEvent))]
        reasons = [row.reason for row in session.scalars(select(DeadLetter))]
    assert {e["event_type"] for e in envelopes} >= {
        "email.queued",
        "email.sent",
        "email.response_recorded",
        "placement_request.outcome_recorded",
    }
    assert MARK not in json.dumps(envelopes)
    assert reasons and MARK not in " ".join(reasons)
