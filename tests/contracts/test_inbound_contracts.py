"""The inbound contract (CONTRACTS.md, SPEC §4) and the envelope of published events.

Pure validation, no database: every message type accepts a valid example, bad input is
refused with a :class:`ContractViolation` whose one-line reason names the field and never
repeats a value, availability windows are checked and merged, and whatever JSON arrives,
validation never fails with any other exception.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comms_tasks.contracts import (
    COMMANDS,
    INBOUND_EVENTS,
    ContractViolation,
    published,
    too_deep,
    validate_command,
    validate_event,
)
from comms_tasks.contracts.common import Contract, availability_to_json
from comms_tasks.contracts.limits import MAX_NESTING
from comms_tasks.task_names import QUEUE_EMAIL, SCHEDULE_CALL

THERAPIST = "comms.handle_therapist_event"
MATCHING = "comms.handle_matching_event"
PATIENT = "comms.handle_patient_event"
EMAIL_RESPONSE = "comms.record_email_response"
CALL_OUTCOME = "comms.record_call_outcome"

# Written down from CONTRACTS.md, not read from the code, so that drift shows.
EVENT_TYPES_BY_TASK = {
    THERAPIST: ("therapist.upserted", "therapist.deleted"),
    MATCHING: (
        "placement_request.created",
        "placement_request.status_changed",
        "placement_request.cancelled",
    ),
    PATIENT: ("patient.updated", "patient.erased"),
}
COMMAND_TASKS = (EMAIL_RESPONSE, CALL_OUTCOME, QUEUE_EMAIL, SCHEDULE_CALL)
ALL_TASKS = (*EVENT_TYPES_BY_TASK, *COMMAND_TASKS)

OCCURRED_AT = "2026-11-02T09:30:00+01:00"
MARKER = "MARKER-7f3a"

# --- factories ------------------------------------------------------------------------


def envelope(event_type: str, payload: Any, **overrides: Any) -> dict[str, Any]:
    """An event as another service sends it; ``overrides`` replace envelope keys."""
    message = {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "version": 1,
        "occurred_at": OCCURRED_AT,
        "producer": "matching-service",
        "payload": payload,
    }
    message.update(overrides)
    return message


def command(fields: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A command as another service sends it; ``overrides`` replace its fields."""
    return {"command_id": str(uuid.uuid4()), **fields, **overrides}


def without(message: dict[str, Any], key: str) -> dict[str, Any]:
    return {name: value for name, value in message.items() if name != key}


def therapist_payload(**overrides: Any) -> dict[str, Any]:
    return {
        "therapist_id": 17,
        "salutation": "Frau",
        "title": "Dr.",
        "first_name": "Johanna",
        "last_name": "Weber",
        "email": "praxis.weber@example.de",
        "phone": "+49 30 1234567",
        "phone_availability": {
            "monday": [{"start": "09:00", "end": "12:00"}, {"start": "14:00", "end": "16:30"}],
            "thursday": [{"start": "08:00", "end": "09:00"}],
        },
        "status": "active",
        **overrides,
    }


def patient(**overrides: Any) -> dict[str, Any]:
    return {
        "registered_on": "2026-10-01",
        "diagnosis": "F32.1",
        "gender": "weiblich",
        "time_availability": "Montags und mittwochs vormittags",
        "symptoms_since": "Frühjahr 2026",
        "open_to_group_therapy": False,
        "therapy_experience": "keine",
        "current_complaints": "Schlafstörungen, Antriebslosigkeit",
        **overrides,
    }


def created_payload(**overrides: Any) -> dict[str, Any]:
    return {
        "placement_request_id": 301,
        "patient_id": 88,
        "therapist_id": 17,
        "created_at": "2026-11-01T18:05:00+01:00",
        "patient": patient(),
        **overrides,
    }


def example_payload(event_type: str) -> dict[str, Any]:
    payloads: dict[str, Callable[[], dict[str, Any]]] = {
        "therapist.upserted": therapist_payload,
        "therapist.deleted": lambda: {"therapist_id": 17},
        "placement_request.created": created_payload,
        "placement_request.status_changed": lambda: {
            "placement_request_id": 301,
            "old_status": "open",
            "new_status": "in_progress",
            "reason": None,
        },
        "placement_request.cancelled": lambda: {
            "placement_request_id": 301,
            "reason": "Patientin hat einen Platz gefunden",
        },
        "patient.updated": lambda: {"patient_id": 88, "patient": patient()},
        "patient.erased": lambda: {"patient_id": 88},
    }
    return payloads[event_type]()


def email_response(**overrides: Any) -> dict[str, Any]:
    return command(
        {
            "email_id": 5,
            "received_at": "2026-11-03T11:12:00+01:00",
            "content": "Ich kann Frau M. ab Januar aufnehmen.",
            "outcomes": [
                {"placement_request_id": 301, "outcome": "accepted", "notes": "ab Januar"},
                {"placement_request_id": 302, "outcome": "rejected", "notes": None},
                {"placement_request_id": 303, "outcome": "needs_follow_up", "notes": None},
            ],
        },
        overrides,
    )


def call_outcome(**overrides: Any) -> dict[str, Any]:
    return command(
        {
            "call_id": 9,
            "status": "completed",
            "occurred_at": "2026-11-10T10:05:00+01:00",
            "outcome": "erreicht",
            "notes": None,
            "retry_after": None,
            "requests": [
                {
                    "placement_request_id": 301,
                    "discussed": True,
                    "outcome": "accepted",
                    "notes": None,
                },
                {"placement_request_id": 302, "discussed": False, "outcome": None, "notes": None},
            ],
        },
        overrides,
    )


def queue_email(**overrides: Any) -> dict[str, Any]:
    return command(
        {
            "therapist_id": 17,
            "template": "follow_up",
            "placement_request_ids": [301, 302],
            "reply_to_email_id": 5,
        },
        overrides,
    )


def schedule_call(**overrides: Any) -> dict[str, Any]:
    return command(
        {
            "therapist_id": 17,
            "placement_request_ids": [301],
            "at": "2026-11-10T10:00:00+01:00",
            "notes": None,
        },
        overrides,
    )


COMMAND_FACTORIES: dict[str, Callable[..., dict[str, Any]]] = {
    EMAIL_RESPONSE: email_response,
    CALL_OUTCOME: call_outcome,
    QUEUE_EMAIL: queue_email,
    SCHEDULE_CALL: schedule_call,
}


def example_message(task_name: str, event_type: str | None = None) -> dict[str, Any]:
    if task_name in COMMAND_FACTORIES:
        return COMMAND_FACTORIES[task_name]()
    event_type = event_type or EVENT_TYPES_BY_TASK[task_name][0]
    return envelope(event_type, example_payload(event_type))


def validate(task_name: str, raw: Any) -> Contract:
    if task_name in COMMAND_FACTORIES:
        return validate_command(task_name, raw)
    return validate_event(task_name, raw)


def violation(task_name: str, raw: Any) -> ContractViolation:
    with pytest.raises(ContractViolation) as caught:
        validate(task_name, raw)
    return caught.value


# --- every message type accepts a valid example ------------------------------------


def test_the_contract_covers_exactly_the_tasks_and_types_of_contracts_md() -> None:
    assert {task: tuple(types) for task, types in INBOUND_EVENTS.items()} == EVENT_TYPES_BY_TASK
    assert set(COMMANDS) == set(COMMAND_TASKS)


@pytest.mark.parametrize(
    ("task_name", "event_type"),
    [(task, event_type) for task, types in EVENT_TYPES_BY_TASK.items() for event_type in types],
)
def test_a_valid_event_of_every_type_validates(task_name: str, event_type: str) -> None:
    raw = envelope(event_type, example_payload(event_type))

    event = validate_event(task_name, raw)

    assert type(event) is INBOUND_EVENTS[task_name][event_type]
    # Nothing is lost or reinterpreted on the way in.
    assert event.model_dump(mode="json") == raw


@pytest.mark.parametrize("task_name", COMMAND_TASKS)
def test_a_valid_command_of_every_kind_validates(task_name: str) -> None:
    raw = COMMAND_FACTORIES[task_name]()

    result = validate_command(task_name, raw)

    assert type(result) is COMMANDS[task_name]
    assert result.model_dump(mode="json") == raw


@pytest.mark.parametrize(
    ("task_name", "raw"),
    [
        pytest.param(
            THERAPIST,
            envelope(
                "therapist.upserted",
                therapist_payload(
                    salutation=None,
                    title=None,
                    email=None,
                    phone=None,
                    phone_availability=None,
                    status="blocked",
                ),
            ),
            id="therapist-nullable-fields-null",
        ),
        pytest.param(
            MATCHING,
            envelope("placement_request.created", created_payload(patient={})),
            id="patient-summary-empty",
        ),
        pytest.param(
            MATCHING,
            envelope(
                "placement_request.status_changed",
                {
                    "placement_request_id": 1,
                    "old_status": "accepted",
                    "new_status": "cancelled",
                    "reason": "zurückgezogen",
                },
            ),
            id="status-changed-with-reason",
        ),
        pytest.param(
            CALL_OUTCOME,
            call_outcome(status="failed", outcome=None, retry_after="2026-11-12", requests=[]),
            id="call-failed-with-retry-after",
        ),
        pytest.param(CALL_OUTCOME, call_outcome(status="cancelled"), id="call-cancelled"),
        pytest.param(
            EMAIL_RESPONSE, email_response(content=None, outcomes=[]), id="response-no-content"
        ),
        pytest.param(
            QUEUE_EMAIL,
            queue_email(template="confirmation", reply_to_email_id=None),
            id="confirmation-unthreaded",
        ),
        pytest.param(SCHEDULE_CALL, schedule_call(at=None), id="call-first-free-slot"),
        pytest.param(
            THERAPIST,
            envelope("therapist.deleted", {"therapist_id": 1}, occurred_at="2026-11-02T08:30:00Z"),
            id="utc-z-suffix",
        ),
    ],
)
def test_valid_variants_validate(task_name: str, raw: dict[str, Any]) -> None:
    assert isinstance(validate(task_name, raw), Contract)


# --- bad input: a ContractViolation naming the field -------------------------------

INVALID_MESSAGES = [
    # wrong type
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(therapist_id="5")),
        "event.payload.therapist_id",
        id="string-for-int",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(therapist_id=5.5)),
        "event.payload.therapist_id",
        id="float-for-int",
    ),
    pytest.param(
        MATCHING,
        envelope(
            "placement_request.created",
            created_payload(patient=patient(open_to_group_therapy=1)),
        ),
        "event.payload.patient.open_to_group_therapy",
        id="int-for-bool",
    ),
    pytest.param(
        CALL_OUTCOME,
        call_outcome(
            requests=[{"placement_request_id": 1, "discussed": 1, "outcome": None, "notes": None}]
        ),
        "command.requests[0].discussed",
        id="int-for-bool-in-list",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(last_name=42)),
        "event.payload.last_name",
        id="int-for-string",
    ),
    pytest.param(
        EMAIL_RESPONSE, email_response(email_id="5"), "command.email_id", id="command-string-id"
    ),
    pytest.param(
        QUEUE_EMAIL,
        queue_email(placement_request_ids=[301, "302"]),
        "command.placement_request_ids[1]",
        id="string-in-id-list",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(therapist_id=0)),
        "event.payload.therapist_id",
        id="id-zero",
    ),
    # missing field
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", without(therapist_payload(), "status")),
        "event.payload.status",
        id="missing-payload-field",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", without(therapist_payload(), "email")),
        "event.payload.email",
        id="missing-nullable-field",
    ),
    pytest.param(
        PATIENT,
        without(envelope("patient.erased", {"patient_id": 1}), "occurred_at"),
        "event.occurred_at",
        id="missing-envelope-field",
    ),
    pytest.param(
        PATIENT,
        without(envelope("patient.erased", {"patient_id": 1}), "payload"),
        "event.payload",
        id="missing-payload",
    ),
    pytest.param(
        SCHEDULE_CALL,
        without(schedule_call(), "therapist_id"),
        "command.therapist_id",
        id="missing-command-field",
    ),
    # unknown keys
    pytest.param(
        PATIENT,
        envelope("patient.erased", {"patient_id": 1}, trace_id="abc"),
        "event.trace_id",
        id="unknown-top-level-key",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(fax="030 1")),
        "event.payload.fax",
        id="unknown-payload-key",
    ),
    pytest.param(
        MATCHING,
        envelope("placement_request.created", created_payload(patient=patient(insurance="AOK"))),
        "event.payload.patient.insurance",
        id="unknown-patient-key",
    ),
    pytest.param(
        QUEUE_EMAIL, queue_email(priority=1), "command.priority", id="unknown-command-key"
    ),
    # unknown enum values
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(status="retired")),
        "event.payload.status",
        id="unknown-therapist-status",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(salutation="Divers")),
        "event.payload.salutation",
        id="unknown-salutation",
    ),
    pytest.param(
        MATCHING,
        envelope(
            "placement_request.status_changed",
            {
                "placement_request_id": 1,
                "old_status": "open",
                "new_status": "done",
                "reason": None,
            },
        ),
        "event.payload.new_status",
        id="unknown-request-status",
    ),
    pytest.param(
        EMAIL_RESPONSE,
        email_response(outcomes=[{"placement_request_id": 1, "outcome": "maybe", "notes": None}]),
        "command.outcomes[0].outcome",
        id="unknown-email-outcome",
    ),
    pytest.param(
        CALL_OUTCOME,
        call_outcome(
            requests=[
                {"placement_request_id": 1, "discussed": True, "outcome": "maybe", "notes": None}
            ]
        ),
        "command.requests[0].outcome",
        id="unknown-call-request-outcome",
    ),
    pytest.param(CALL_OUTCOME, call_outcome(status="busy"), "command.status", id="unknown-call"),
    pytest.param(
        QUEUE_EMAIL,
        queue_email(template="initial_contact"),
        "command.template",
        id="unknown-template",
    ),
    # version, datetimes, ids
    pytest.param(
        PATIENT,
        envelope("patient.erased", {"patient_id": 1}, version=2),
        "event.version",
        id="version-2",
    ),
    pytest.param(
        PATIENT,
        envelope("patient.erased", {"patient_id": 1}, occurred_at="2026-11-02T09:30:00"),
        "event.occurred_at",
        id="naive-occurred-at",
    ),
    pytest.param(
        PATIENT,
        envelope("patient.erased", {"patient_id": 1}, occurred_at=1793608200),
        "event.occurred_at",
        id="epoch-number-occurred-at",
    ),
    pytest.param(
        MATCHING,
        envelope("placement_request.created", created_payload(created_at="2026-11-01T18:05:00")),
        "event.payload.created_at",
        id="naive-created-at",
    ),
    pytest.param(
        EMAIL_RESPONSE,
        email_response(received_at="2026-11-03 11:12"),
        "command.received_at",
        id="naive-received-at",
    ),
    pytest.param(
        SCHEDULE_CALL,
        schedule_call(at="2026-11-10T10:00:00"),
        "command.at",
        id="naive-call-time",
    ),
    pytest.param(
        CALL_OUTCOME,
        call_outcome(retry_after="12.11.2026"),
        "command.retry_after",
        id="bad-date",
    ),
    pytest.param(
        PATIENT,
        envelope("patient.erased", {"patient_id": 1}, event_id="not-a-uuid"),
        "event.event_id",
        id="bad-event-id",
    ),
    pytest.param(
        QUEUE_EMAIL,
        {**queue_email(), "command_id": "1234"},
        "command.command_id",
        id="bad-command-id",
    ),
    # header injection and addresses
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(email="a@b.de\r\nBcc: x@y.de")),
        "event.payload.email",
        id="email-crlf",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(email="a@b.de\nBcc: x@y.de")),
        "event.payload.email",
        id="email-lf",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(email="a@b.de\rBcc: x@y.de")),
        "event.payload.email",
        id="email-cr",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(first_name="Anna\r\nBcc: x@y.de")),
        "event.payload.first_name",
        id="first-name-crlf",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(last_name="Weber\nBcc: x@y.de")),
        "event.payload.last_name",
        id="last-name-lf",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(title="Dr.\rBcc: x@y.de")),
        "event.payload.title",
        id="title-cr",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(email="praxis-weber.example.de")),
        "event.payload.email",
        id="email-without-at",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(email="weber@localhost")),
        "event.payload.email",
        id="email-without-domain",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(email="Weber <weber@example.de>")),
        "event.payload.email",
        id="email-with-display-name",
    ),
    pytest.param(
        THERAPIST,
        envelope("therapist.upserted", therapist_payload(email="a@b.de, c@d.de")),
        "event.payload.email",
        id="two-addresses",
    ),
    # the event type must belong to the task
    pytest.param(
        THERAPIST,
        envelope("patient.updated", {"patient_id": 1, "patient": {}}),
        "event.event_type",
        id="event-type-of-another-task",
    ),
    pytest.param(
        MATCHING,
        envelope("placement_request.deleted", {"placement_request_id": 1}),
        "event.event_type",
        id="unknown-event-type",
    ),
    pytest.param(
        PATIENT,
        without(envelope("patient.erased", {"patient_id": 1}), "event_type"),
        "event.event_type",
        id="missing-event-type",
    ),
    # a command needs at least one request
    pytest.param(
        QUEUE_EMAIL,
        queue_email(placement_request_ids=[]),
        "command.placement_request_ids",
        id="queue-email-no-requests",
    ),
    pytest.param(
        SCHEDULE_CALL,
        schedule_call(placement_request_ids=[]),
        "command.placement_request_ids",
        id="schedule-call-no-requests",
    ),
]


@pytest.mark.parametrize(("task_name", "raw", "field"), INVALID_MESSAGES)
def test_bad_input_names_the_field_and_keeps_the_message_id(
    task_name: str, raw: dict[str, Any], field: str
) -> None:
    error = violation(task_name, raw)

    assert f"{field}:" in error.reason, error.reason
    assert str(error) == error.reason
    assert "\n" not in error.reason and "\r" not in error.reason
    expected_id = raw.get("command_id") if task_name in COMMANDS else raw.get("event_id")
    assert error.message_id == expected_id


@pytest.mark.parametrize("task_name", ALL_TASKS)
@pytest.mark.parametrize("raw", [[], ["event_id"], "{}", "", None, 5, True], ids=repr)
def test_a_message_that_is_not_an_object_is_refused(task_name: str, raw: Any) -> None:
    error = violation(task_name, raw)

    argument = "command" if task_name in COMMANDS else "event"
    assert error.reason.startswith(f"{argument}:")
    assert error.message_id is None


def test_an_unreadable_message_id_is_not_kept() -> None:
    raw = envelope("patient.erased", {"patient_id": 1}, event_id=12345)

    error = violation(PATIENT, raw)

    assert "event.event_id:" in error.reason
    assert error.message_id is None


@pytest.mark.parametrize(
    "version",
    [
        pytest.param(
            True,
        ),
        pytest.param(
            1.0,
        ),
        "1",
        0,
        None,
    ],
    ids=repr,
)
def test_version_must_be_the_integer_1(version: Any) -> None:
    error = violation(PATIENT, envelope("patient.erased", {"patient_id": 1}, version=version))

    assert "event.version:" in error.reason


@pytest.mark.parametrize(
    ("task_name", "raw", "field"),
    [
        pytest.param(
            MATCHING,
            envelope(
                "placement_request.created",
                created_payload(patient=patient(diagnosis="F32\x00.1")),
            ),
            "event.payload.patient.diagnosis",
            id="patient-summary",
        ),
        pytest.param(
            CALL_OUTCOME, call_outcome(notes="zurück\x00rufen"), "command.notes", id="call-notes"
        ),
    ],
)
def test_a_nul_character_in_free_text_is_refused(
    task_name: str, raw: dict[str, Any], field: str
) -> None:
    error = violation(task_name, raw)

    assert f"{field}:" in error.reason


@pytest.mark.parametrize("control", ["\x1b[2J", "\x07", "\x9b", "\x7f"])
def test_a_control_character_in_free_text_is_refused(control: str) -> None:
    raw = envelope(
        "placement_request.created",
        created_payload(patient=patient(diagnosis=f"F32.1 {control}SYSTEM")),
    )
    error = violation(MATCHING, raw)

    assert "event.payload.patient.diagnosis: " in error.reason
    assert "control characters" in error.reason


def test_free_text_keeps_its_tabs_and_line_breaks() -> None:
    raw = envelope(
        "placement_request.created",
        created_payload(patient=patient(current_complaints="Erstens:\tSchlaf\r\nZweitens")),
    )
    validate(MATCHING, raw)


# --- availability -------------------------------------------------------------------


def availability_event(availability: Any) -> dict[str, Any]:
    return envelope("therapist.upserted", therapist_payload(phone_availability=availability))


def merged(availability: dict[str, Any]) -> dict[str, Any] | None:
    event = validate_event(THERAPIST, availability_event(availability))
    return availability_to_json(event.payload.phone_availability)  # type: ignore[attr-defined]


def window(start: str, end: str) -> dict[str, str]:
    return {"start": start, "end": end}


def test_overlapping_and_touching_windows_are_merged_and_sorted() -> None:
    availability = {
        "monday": [window("14:00", "16:00"), window("09:00", "12:00"), window("11:00", "13:00")],
        "tuesday": [window("10:00", "11:00"), window("08:00", "09:00"), window("09:00", "10:00")],
        "friday": [window("08:00", "18:00"), window("12:00", "13:00")],
        "sunday": [window("16:00", "17:00"), window("07:00", "07:30")],
        "wednesday": [],
    }

    assert merged(availability) == {
        "monday": [window("09:00", "13:00"), window("14:00", "16:00")],
        "tuesday": [window("08:00", "11:00")],
        "wednesday": [],
        "friday": [window("08:00", "18:00")],
        "sunday": [window("07:00", "07:30"), window("16:00", "17:00")],
    }


def test_every_weekday_is_accepted() -> None:
    days = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
    availability = {day: [window("00:00", "23:59")] for day in days}

    assert merged(availability) == availability


@pytest.mark.parametrize(
    "availability",
    [
        pytest.param({"funday": [window("09:00", "10:00")]}, id="unknown-day"),
        pytest.param({"Monday": [window("09:00", "10:00")]}, id="capitalised-day"),
        pytest.param({"mon": [window("09:00", "10:00")]}, id="abbreviated-day"),
        pytest.param({"monday": [window("10:00", "10:00")]}, id="end-equals-start"),
        pytest.param({"monday": [window("10:00", "09:00")]}, id="end-before-start"),
        pytest.param({"monday": [window("9:00", "10:00")]}, id="one-digit-hour"),
        pytest.param({"monday": [window("23:00", "24:00")]}, id="hour-24"),
        pytest.param({"monday": [window("12:00", "12:60")]}, id="minute-60"),
        pytest.param({"monday": [window("noon", "13:00")]}, id="word"),
        pytest.param({"monday": [window("09:00:00", "10:00:00")]}, id="with-seconds"),
        pytest.param({"monday": [{"start": 900, "end": 1000}]}, id="numbers"),
        pytest.param({"monday": [{"start": "09:00"}]}, id="missing-end"),
        pytest.param(
            {"monday": [{"start": "09:00", "end": "10:00", "tz": "UTC"}]}, id="unknown-window-key"
        ),
        pytest.param({"monday": {"start": "09:00", "end": "10:00"}}, id="window-not-in-list"),
        pytest.param([window("09:00", "10:00")], id="list-instead-of-days"),
        pytest.param("Mo-Fr 9-12", id="free-text"),
    ],
)
def test_bad_availability_is_refused_naming_phone_availability(availability: Any) -> None:
    error = violation(THERAPIST, availability_event(availability))

    assert "event.payload.phone_availability" in error.reason, error.reason


# --- privacy: a reason never repeats a value -----------------------------------------


def marked_patient() -> dict[str, Any]:
    """A patient summary with the marker in every field that can hold text."""
    return patient(
        diagnosis=f"{MARKER} F32.1",
        gender=MARKER,
        time_availability=f"vormittags {MARKER}",
        symptoms_since=MARKER,
        therapy_experience=MARKER,
        current_complaints=f"Schlafstörungen {MARKER}",
    )


def test_the_marked_patient_is_valid_on_its_own() -> None:
    raw = envelope("placement_request.created", created_payload(patient=marked_patient()))

    event = validate_event(MATCHING, raw)

    assert MARKER in event.payload.patient.diagnosis  # type: ignore[attr-defined]


PRIVACY_BREAKAGES: list[Any] = [
    pytest.param(
        {"open_to_group_therapy": MARKER},
        ["event.payload.patient.open_to_group_therapy"],
        id="bool",
    ),
    pytest.param({"registered_on": MARKER}, ["event.payload.patient.registered_on"], id="date"),
    pytest.param({"diagnosis": [MARKER]}, ["event.payload.patient.diagnosis"], id="list"),
    pytest.param({"gender": {MARKER: MARKER}}, ["event.payload.patient.gender"], id="object"),
    pytest.param(
        {"current_complaints": (MARKER + " ") * 500},
        ["event.payload.patient.current_complaints"],
        id="too-long",
    ),
    pytest.param({"hobby": MARKER}, ["event.payload.patient.hobby"], id="unknown-key"),
    pytest.param(
        {"registered_on": MARKER, "open_to_group_therapy": MARKER, "hobby": MARKER},
        [
            "event.payload.patient.registered_on",
            "event.payload.patient.open_to_group_therapy",
            "event.payload.patient.hobby",
        ],
        id="several-at-once",
    ),
]


@pytest.mark.parametrize(("changes", "fields"), PRIVACY_BREAKAGES)
def test_a_reason_never_repeats_patient_data(changes: dict[str, Any], fields: list[str]) -> None:
    raw = envelope(
        "placement_request.created", created_payload(patient={**marked_patient(), **changes})
    )
    if "current_complaints" in changes:
        assert len(changes["current_complaints"]) > 5000

    error = violation(MATCHING, raw)

    for field in fields:
        assert f"{field}:" in error.reason
    assert MARKER not in error.reason
    assert MARKER not in repr(error)
    # A logged traceback shows neither the value nor pydantic's error (which would).
    assert MARKER not in "".join(traceback.format_exception(error))


def test_a_reason_never_repeats_patient_data_when_the_envelope_is_broken_too() -> None:
    raw = envelope(
        "placement_request.created",
        created_payload(patient={**marked_patient(), "open_to_group_therapy": MARKER}),
        version=2,
        occurred_at="gestern",
        unexpected=MARKER,
    )

    error = violation(MATCHING, raw)

    assert "(and " in error.reason  # more errors than the reason lists
    assert MARKER not in error.reason


@pytest.mark.parametrize(
    "patient_changes",
    [{"diagnosis": MARKER * 700}, {"open_to_group_therapy": MARKER}],
    ids=["too-long", "wrong-type"],
)
def test_patient_updated_reason_never_repeats_patient_data(patient_changes: dict[str, Any]) -> None:
    raw = envelope("patient.updated", {"patient_id": 88, "patient": patient(**patient_changes)})

    error = violation(PATIENT, raw)

    assert "event.payload.patient." in error.reason
    assert MARKER not in error.reason


@pytest.mark.parametrize(
    "key",
    [
        "HIV positiv, Suizidversuch 2025",
        "Diagnose",
        "f32.1",
        "x" * 41,
        "notes: F32.1; suicidal",
        "sch\u00e4del",
    ],
)
def test_an_unknown_key_that_is_no_identifier_is_not_named_in_the_reason(key: str) -> None:
    raw = envelope("placement_request.created", created_payload(patient={**patient(), key: True}))

    error = violation(MATCHING, raw)

    assert error.reason == "event.payload.patient.<unknown key>: Extra inputs are not permitted"


def test_an_unknown_key_that_looks_like_an_identifier_is_named() -> None:
    raw = envelope(
        "placement_request.created",
        created_payload(patient={**patient(), "insurance_2": True, "_x": 1}),
    )

    error = violation(MATCHING, raw)

    assert "event.payload.patient.insurance_2: Extra inputs are not permitted" in error.reason
    assert "event.payload.patient._x: Extra inputs are not permitted" in error.reason


# --- fuzzing: nothing but a model or a ContractViolation ----------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=25,
)


def check_outcome(task_name: str, raw: Any) -> None:
    try:
        result = validate(task_name, copy.deepcopy(raw))
    except ContractViolation as error:
        assert error.reason
        assert "\n" not in error.reason and "\r" not in error.reason
        assert error.message_id is None or isinstance(error.message_id, str)
    else:
        assert isinstance(result, Contract)


@pytest.mark.parametrize("task_name", ALL_TASKS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=json_values)
def test_arbitrary_json_gives_a_model_or_a_contract_violation(task_name: str, raw: Any) -> None:
    check_outcome(task_name, raw)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside a message where a value sits."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths(child, (*prefix, index))
    return found


def replaced(message: Any, path: tuple[Any, ...], value: Any) -> Any:
    result = copy.deepcopy(message)
    target = result
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return result


EXAMPLES = [
    (task, event_type) for task, types in EVENT_TYPES_BY_TASK.items() for event_type in types
] + [(task, None) for task in COMMAND_TASKS]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), example=st.sampled_from(EXAMPLES))
def test_a_valid_message_with_any_one_value_replaced_never_breaks_validation(
    data: st.DataObject, example: tuple[str, str | None]
) -> None:
    task_name, event_type = example
    message = example_message(task_name, event_type)
    path = data.draw(st.sampled_from(paths(message)), label="path")
    value = data.draw(json_values, label="value")

    check_outcome(task_name, replaced(message, path, value))


# --- published events: the envelope we send -------------------------------------------

SENT_AT = dt.datetime(2026, 11, 3, 8, 0, tzinfo=dt.UTC)
PAYLOAD_EXAMPLES: dict[str, Contract] = {
    "email.queued": published.EmailQueuedPayload(
        email_id=5, therapist_id=17, placement_request_ids=[301, 302]
    ),
    "email.sent": published.EmailSentPayload(
        email_id=5, therapist_id=17, message_id="<abc@comms.example>", sent_at=SENT_AT
    ),
    "email.failed": published.EmailFailedPayload(
        email_id=5, therapist_id=17, reason="550 mailbox unavailable"
    ),
    "email.bounced": published.EmailBouncedPayload(
        email_id=5, therapist_id=17, permanent=True, status="5.1.1", bounced_at=SENT_AT
    ),
    "email.response_recorded": published.EmailResponseRecordedPayload(
        email_id=5, therapist_id=17, received_at=SENT_AT, source="mailbox"
    ),
    "placement_request.outcome_recorded": published.OutcomeRecordedPayload(
        placement_request_id=301, therapist_id=17, outcome="accepted", via="call", source_id=9
    ),
    "call.scheduled": published.CallScheduledPayload(
        call_id=9, therapist_id=17, scheduled_at=SENT_AT, placement_request_ids=[301]
    ),
    "call.unschedulable": published.CallUnschedulablePayload(
        email_id=5, therapist_id=17, reason="no phone availability"
    ),
    "call.completed": published.CallCompletedPayload(call_id=9, therapist_id=17),
    "call.failed": published.CallFailedPayload(
        call_id=9, therapist_id=17, attempt=1, next_call_id=10
    ),
}


def test_there_is_an_example_of_every_published_event_type() -> None:
    assert set(PAYLOAD_EXAMPLES) == set(published.EVENT_PAYLOADS)


@pytest.mark.parametrize("event_type", list(PAYLOAD_EXAMPLES))
def test_build_event_gives_a_valid_envelope(event_type: str) -> None:
    payload = PAYLOAD_EXAMPLES[event_type]
    berlin_morning = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))

    event = published.build_event(payload, occurred_at=berlin_morning)

    assert type(payload) is published.EVENT_PAYLOADS[event_type]
    assert event["event_type"] == event_type
    assert event["producer"] == "communication-service"
    assert event["version"] == 1
    assert uuid.UUID(str(event["event_id"])).version == 4
    assert dt.datetime.fromisoformat(str(event["occurred_at"])) == berlin_morning
    assert dt.datetime.fromisoformat(str(event["occurred_at"])).utcoffset() == dt.timedelta(0)
    assert event["payload"] == payload.model_dump(mode="json")
    # It travels as JSON and is what its published schema describes.
    model = published.published_event_model(event_type)
    parsed = model.model_validate_json(json.dumps(event), strict=True)
    assert parsed.payload == payload  # type: ignore[attr-defined]


def test_build_event_gives_every_event_a_fresh_id() -> None:
    payload = PAYLOAD_EXAMPLES["call.completed"]

    first = published.build_event(payload, occurred_at=SENT_AT)
    second = published.build_event(payload, occurred_at=SENT_AT)

    assert first["event_id"] != second["event_id"]


def test_a_published_event_model_accepts_only_its_own_type_and_producer() -> None:
    event = published.build_event(PAYLOAD_EXAMPLES["call.completed"], occurred_at=SENT_AT)
    model = published.published_event_model("call.completed")

    with pytest.raises(ValueError, match="event_type"):
        model.model_validate({**event, "event_type": "call.failed"})
    with pytest.raises(ValueError, match="producer"):
        model.model_validate({**event, "producer": "matching-service"})


# --- nesting ----------------------------------------------------------------------------


def deep_list(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [MAX_NESTING, 600, 50_000])
def test_a_message_nested_beyond_the_bound_is_refused_naming_the_field(depth: int) -> None:
    raw = call_outcome()
    raw["requests"][0]["notes"] = deep_list(depth)

    refused = violation(CALL_OUTCOME, raw)

    assert refused.reason == (
        f"command.requests[0]: is nested too deeply (more than {MAX_NESTING} levels)"
    )
    assert refused.message_id == raw["command_id"]


def test_the_deepest_valid_message_is_far_from_the_nesting_bound() -> None:
    # envelope, payload, availability, a day's windows, a window: 5 levels.
    event = availability_event({"monday": [window("09:00", "12:00")]})
    assert too_deep(event, 5) is None
    assert too_deep(event, 4) is not None
    validate(THERAPIST, event)


# --- one request, one entry -------------------------------------------------------------


def _same_request_twice_in_email_response() -> dict[str, Any]:
    raw = email_response()
    raw["outcomes"][2]["placement_request_id"] = 301
    raw["outcomes"][2]["outcome"] = "rejected"
    return raw


def _same_request_twice_in_call_outcome() -> dict[str, Any]:
    raw = call_outcome()
    raw["requests"][1] = {
        "placement_request_id": 301,
        "discussed": True,
        "outcome": "rejected",
        "notes": None,
    }
    return raw


@pytest.mark.parametrize(
    ("task_name", "make", "field"),
    [
        (EMAIL_RESPONSE, _same_request_twice_in_email_response, "outcomes[2].placement_request_id"),
        (CALL_OUTCOME, _same_request_twice_in_call_outcome, "requests[1].placement_request_id"),
        (
            QUEUE_EMAIL,
            lambda: queue_email(placement_request_ids=[301, 302, 301]),
            "placement_request_ids[2]",
        ),
        (
            SCHEDULE_CALL,
            lambda: schedule_call(placement_request_ids=[301, 301]),
            "placement_request_ids[1]",
        ),
    ],
    ids=["email_response", "call_outcome", "queue_email", "schedule_call"],
)
def test_a_request_named_twice_in_one_command_is_refused_naming_the_entry(
    task_name: str, make: Callable[[], dict[str, Any]], field: str
) -> None:
    raw = make()

    refused = violation(task_name, raw)

    assert refused.reason == f"command.{field}: names a request named before in this command"
    assert refused.message_id == raw["command_id"]
