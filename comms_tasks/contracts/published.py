"""The events we publish on the exchange ``comms.events``: ids only, never patient data."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

from pydantic import AwareDatetime, Field, create_model

from comms_tasks.contracts.common import Contract, Id, OutcomeValue
from comms_tasks.contracts.received import Envelope

PRODUCER = "communication-service"
EVENTS_EXCHANGE = "comms.events"


class EmailQueuedPayload(Contract):
    email_id: Id
    therapist_id: Id
    placement_request_ids: list[Id]


class EmailSentPayload(Contract):
    email_id: Id
    therapist_id: Id
    message_id: str
    sent_at: AwareDatetime


class EmailFailedPayload(Contract):
    email_id: Id
    therapist_id: Id
    reason: str


# Where an answer came from: a command of another service, the mailbox, an operator.
ResponseSource = Literal["message", "mailbox", "operator"]


class EmailResponseRecordedPayload(Contract):
    email_id: Id
    therapist_id: Id
    received_at: AwareDatetime
    source: ResponseSource


class EmailBouncedPayload(Contract):
    """No diagnostic text: it may quote the address."""

    email_id: Id
    therapist_id: Id
    permanent: bool
    # The enhanced status code (RFC 3463), e.g. ``5.1.1``; null when the bounce gave none.
    status: str | None = Field(pattern=r"^[245]\.\d{1,3}\.\d{1,3}$")
    bounced_at: AwareDatetime


class OutcomeRecordedPayload(Contract):
    placement_request_id: Id
    therapist_id: Id
    outcome: OutcomeValue
    via: Literal["email", "call"]
    source_id: Id


class CallScheduledPayload(Contract):
    call_id: Id
    therapist_id: Id
    scheduled_at: AwareDatetime
    placement_request_ids: list[Id]


class CallUnschedulablePayload(Contract):
    email_id: Id
    therapist_id: Id
    reason: str


class CallCompletedPayload(Contract):
    call_id: Id
    therapist_id: Id


class CallFailedPayload(Contract):
    call_id: Id
    therapist_id: Id
    attempt: int
    next_call_id: Id | None


EVENT_PAYLOADS: dict[str, type[Contract]] = {
    "email.queued": EmailQueuedPayload,
    "email.sent": EmailSentPayload,
    "email.failed": EmailFailedPayload,
    "email.bounced": EmailBouncedPayload,
    "email.response_recorded": EmailResponseRecordedPayload,
    "placement_request.outcome_recorded": OutcomeRecordedPayload,
    "call.scheduled": CallScheduledPayload,
    "call.unschedulable": CallUnschedulablePayload,
    "call.completed": CallCompletedPayload,
    "call.failed": CallFailedPayload,
}


def published_event_model(event_type: str) -> type[Envelope]:
    """The full envelope model of one published event type (for its JSON Schema)."""
    fields: dict[str, Any] = {
        "event_type": (Literal[event_type], ...),
        "producer": (Literal[PRODUCER], ...),
        "payload": (EVENT_PAYLOADS[event_type], ...),
    }
    name = "".join(part.title() for part in event_type.replace(".", "_").split("_")) + "Event"
    model: type[Envelope] = create_model(name, __base__=Envelope, **fields)
    return model


def build_event(payload: Contract, *, occurred_at: dt.datetime) -> dict[str, object]:
    """A JSON-ready envelope for ``payload``, with a fresh event id."""
    event_type = next(name for name, model in EVENT_PAYLOADS.items() if type(payload) is model)
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "version": 1,
        "occurred_at": occurred_at.astimezone(dt.UTC).isoformat(),
        "producer": PRODUCER,
        "payload": payload.model_dump(mode="json"),
    }
