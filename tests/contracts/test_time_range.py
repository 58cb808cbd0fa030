"""Dates and times have a sane range at the contract, so that arithmetic on them holds.

A contract-valid ``at`` of 9999-12-31T23:58Z or an ``occurred_at`` of
0001-01-01T00:30+01:00 made the task fail with an ``OverflowError`` (converting to UTC,
adding a day); it was lost. Years 1900 to 2199 are accepted; anything else is refused
naming the field.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from comms_tasks.app import app
from comms_tasks.appliers import APPLIERS
from comms_tasks.contracts import ContractViolation
from comms_tasks.models import DeadLetter
from comms_tasks.task_names import SCHEDULE_CALL
from tests import factories as f
from tests.contracts.test_inbound_contracts import (
    CALL_OUTCOME,
    EMAIL_RESPONSE,
    MATCHING,
    PATIENT,
    call_outcome,
    created_payload,
    email_response,
    envelope,
    patient,
    schedule_call,
    validate,
)
from tests.emails import test_email_pipeline as pipeline

OUT_OF_RANGE: list[Any] = [
    pytest.param(SCHEDULE_CALL, schedule_call(at="9999-12-31T23:58:00Z"), "command.at", id="at"),
    pytest.param(
        CALL_OUTCOME,
        call_outcome(occurred_at="0001-01-01T00:30:00+01:00"),
        "command.occurred_at",
        id="call-occurred-at",
    ),
    pytest.param(
        CALL_OUTCOME, call_outcome(retry_after="9999-12-31"), "command.retry_after", id="retry"
    ),
    pytest.param(
        EMAIL_RESPONSE,
        email_response(received_at="1899-12-31T23:59:00Z"),
        "command.received_at",
        id="received-at",
    ),
    pytest.param(
        PATIENT,
        envelope("patient.erased", {"patient_id": 1}, occurred_at="0001-01-01T00:30:00+01:00"),
        "event.occurred_at",
        id="envelope",
    ),
    pytest.param(
        MATCHING,
        envelope("placement_request.created", created_payload(created_at="2200-01-01T00:00:00Z")),
        "event.payload.created_at",
        id="created-at",
    ),
    pytest.param(
        MATCHING,
        envelope(
            "placement_request.created",
            created_payload(patient=patient(registered_on="0001-01-01")),
        ),
        "event.payload.patient.registered_on",
        id="registered-on",
    ),
]


@pytest.mark.parametrize(("task_name", "raw", "field"), OUT_OF_RANGE)
def test_a_date_or_time_outside_the_years_1900_to_2199_is_refused_naming_the_field(
    task_name: str, raw: dict[str, Any], field: str
) -> None:
    with pytest.raises(ContractViolation) as caught:
        validate(task_name, raw)

    assert f"{field}: must be between the years 1900 and 2199" in caught.value.reason


@pytest.mark.parametrize(
    "at", ["1900-01-01T00:00:00+01:00", "2199-12-31T23:59:00-12:00", "2026-11-10T10:00:00Z"]
)
def test_the_ends_of_the_range_are_accepted(at: str) -> None:
    validate(SCHEDULE_CALL, schedule_call(at=at))


def test_a_schedule_call_far_in_the_future_is_a_dead_letter_not_a_lost_task(
    domain_db: Connection,
) -> None:
    pipeline.therapist(17)
    pipeline.apply(pipeline.MATCHING, f.request_created(301, therapist_id=17))
    command = schedule_call(at="9999-12-31T23:58:00Z")

    assert SCHEDULE_CALL in APPLIERS
    result = app.tasks[SCHEDULE_CALL].apply(kwargs={"command": command})

    assert result.successful(), result.traceback
    with Session(domain_db) as session:
        [letter] = session.scalars(select(DeadLetter)).all()
    assert letter.message_id == command["command_id"]
    assert letter.reason.startswith("command.at: must be between the years")
