"""Pydantic models of every inbound message and published event, and their validation.

:func:`validate_event` and :func:`validate_command` are the one door every inbound
message goes through: each returns a model, or raises :class:`ContractViolation` with a
one-line reason that names the field and never repeats a value of the message (values
may be health data).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from comms_tasks.contracts import received
from comms_tasks.contracts.common import FIELD_ERROR, Contract
from comms_tasks.contracts.limits import MAX_NESTING
from comms_tasks.contracts.received import Command, Envelope
from comms_tasks.task_names import (
    HANDLE_MATCHING_EVENT,
    HANDLE_PATIENT_EVENT,
    HANDLE_THERAPIST_EVENT,
    QUEUE_EMAIL,
    RECORD_CALL_OUTCOME,
    RECORD_EMAIL_RESPONSE,
    SCHEDULE_CALL,
)

INBOUND_EVENTS: dict[str, dict[str, type[Envelope]]] = {
    HANDLE_THERAPIST_EVENT: {
        "therapist.upserted": received.TherapistUpserted,
        "therapist.deleted": received.TherapistDeleted,
    },
    HANDLE_MATCHING_EVENT: {
        "placement_request.created": received.PlacementRequestCreated,
        "placement_request.status_changed": received.PlacementRequestStatusChanged,
        "placement_request.cancelled": received.PlacementRequestCancelled,
    },
    HANDLE_PATIENT_EVENT: {
        "patient.updated": received.PatientUpdated,
        "patient.erased": received.PatientErased,
    },
}

COMMANDS: dict[str, type[Command]] = {
    RECORD_EMAIL_RESPONSE: received.RecordEmailResponse,
    RECORD_CALL_OUTCOME: received.RecordCallOutcome,
    QUEUE_EMAIL: received.QueueEmail,
    SCHEDULE_CALL: received.ScheduleCall,
}

# The keyword argument that carries the message, per kind.
EVENT_ARGUMENT = "event"
COMMAND_ARGUMENT = "command"

MAX_REASON_ERRORS = 3
MAX_MESSAGE_ID = 200


class ContractViolation(ValueError):
    """An inbound message that does not satisfy its contract."""

    def __init__(self, reason: str, message_id: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message_id = message_id


class Rejected(ContractViolation):
    """A well-formed message that cannot be applied (e.g. it names an unknown id)."""


# A key of the message may be anything the sender wrote, health data too ("HIV positiv"
# as a key): a reason names it only when it looks like an identifier, as every key of
# the contracts does, and says UNKNOWN_KEY in place of any other.
MAX_KEY_IN_REASON = 40
NAMEABLE_KEY = re.compile(rf"[a-z_][a-z0-9_]{{0,{MAX_KEY_IN_REASON - 1}}}")
UNKNOWN_KEY = "<unknown key>"


def _key(part: str) -> str:
    return part if NAMEABLE_KEY.fullmatch(part) else UNKNOWN_KEY


def _field_name(loc: tuple[int | str, ...], prefix: str) -> str:
    parts = [prefix]
    for part in loc:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{_key(part)}")
    return "".join(parts)


def describe(error: ValidationError, prefix: str) -> str:
    """One line: each failing field and what is wrong with it, without the values."""
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        message = item["msg"].removeprefix("Value error, ")
        loc = tuple(item["loc"])
        if item["type"] == FIELD_ERROR:
            loc += tuple(item.get("ctx", {}).get("loc", ()))
        problems.append(f"{_field_name(loc, prefix)}: {message}")
    extra = len(problems) - MAX_REASON_ERRORS
    reason = "; ".join(problems[:MAX_REASON_ERRORS])
    if extra > 0:
        reason += f" (and {extra} more)"
    return reason.replace("\r", " ").replace("\n", " ")


def readable_message_id(raw: Any, key: str) -> str | None:
    """The idempotency key of a raw message, if it has one that can be stored."""
    if isinstance(raw, dict):
        value = raw.get(key)
        if isinstance(value, str) and 0 < len(value) <= MAX_MESSAGE_ID and value.isprintable():
            return value
    return None


def too_deep(raw: Any, limit: int) -> tuple[int | str, ...] | None:
    """Where ``raw`` holds containers more than ``limit`` levels deep, or None.

    Walked with a stack of its own, not by recursion: a fuzzed message may be nested
    far deeper than Python's recursion limit.
    """
    stack: list[tuple[Any, tuple[int | str, ...], int]] = [(raw, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict):
            items: Any = value.items()
        elif isinstance(value, list | tuple):
            items = enumerate(value)
        else:
            continue
        if depth > limit:
            return path
        for key, item in items:
            stack.append((item, (*path, key if isinstance(key, int) else str(key)), depth + 1))
    return None


def _strict(model: type[Contract], raw: Any, prefix: str, message_id: str | None) -> Any:
    # Validating the JSON text in strict mode: "5" is not an int and 1 is not a bool, but
    # ISO strings are datetimes, dates and UUIDs, exactly as they travel on the wire.
    deep = too_deep(raw, MAX_NESTING)
    if deep is not None:
        raise ContractViolation(
            f"{_field_name(deep[:2], prefix)}: is nested too deeply "
            f"(more than {MAX_NESTING} levels)",
            message_id,
        )
    try:
        text = json.dumps(raw, allow_nan=False)
    except (TypeError, ValueError):
        raise ContractViolation(f"{prefix}: is not a JSON value", message_id) from None
    except RecursionError:  # not reached after the check above; never a crash
        raise ContractViolation(f"{prefix}: is nested too deeply", message_id) from None
    try:
        return model.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise ContractViolation(describe(exc, prefix), message_id) from None


def validate_event(task_name: str, raw: Any) -> Envelope:
    models = INBOUND_EVENTS[task_name]
    message_id = readable_message_id(raw, "event_id")
    if not isinstance(raw, dict):
        raise ContractViolation(f"{EVENT_ARGUMENT}: must be a JSON object", message_id)
    event_type = raw.get("event_type")
    model = models.get(event_type) if isinstance(event_type, str) else None
    if model is None:
        expected = ", ".join(models)
        raise ContractViolation(
            f"{EVENT_ARGUMENT}.event_type: must be one of {expected}", message_id
        )
    result: Envelope = _strict(model, raw, EVENT_ARGUMENT, message_id)
    return result


def validate_command(task_name: str, raw: Any) -> Command:
    message_id = readable_message_id(raw, "command_id")
    if not isinstance(raw, dict):
        raise ContractViolation(f"{COMMAND_ARGUMENT}: must be a JSON object", message_id)
    result: Command = _strict(COMMANDS[task_name], raw, COMMAND_ARGUMENT, message_id)
    return result
