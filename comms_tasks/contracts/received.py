"""The messages other services send us, one model per message type."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from comms_tasks.contracts.common import (
    Availability,
    Contract,
    Day,
    EmailAddress,
    FreeText,
    Id,
    Instant,
    Name,
    OutcomeValue,
    PlacementRequestStatusValue,
    SingleLine,
    field_error,
)
from comms_tasks.contracts.limits import MAX_REQUESTS_PER_MESSAGE

# --- The envelope of every event -------------------------------------------------


def _integer_only(value: object) -> object:
    # Strict mode does not reach into Literal: true and 1.0 would pass as 1.
    if type(value) is not int:
        raise ValueError("must be the integer 1")
    return value


class Envelope(Contract):
    event_id: uuid.UUID
    event_type: str
    version: Annotated[Literal[1], BeforeValidator(_integer_only)]
    occurred_at: Instant
    producer: SingleLine = Field(min_length=1)


# --- comms.handle_therapist_event ------------------------------------------------


class TherapistUpsertedPayload(Contract):
    therapist_id: Id
    salutation: Literal["Frau", "Herr"] | None
    title: SingleLine | None
    first_name: Name
    last_name: Name
    email: EmailAddress | None
    phone: SingleLine | None
    phone_availability: Availability | None
    status: Literal["active", "blocked", "inactive"]


class TherapistDeletedPayload(Contract):
    therapist_id: Id


class TherapistUpserted(Envelope):
    event_type: Literal["therapist.upserted"]
    payload: TherapistUpsertedPayload


class TherapistDeleted(Envelope):
    event_type: Literal["therapist.deleted"]
    payload: TherapistDeletedPayload


# --- comms.handle_matching_event -------------------------------------------------


class PatientSummary(Contract):
    """What a therapist needs to decide. Health data: never logged, never in events."""

    registered_on: Day | None = None
    diagnosis: FreeText | None = None
    gender: FreeText | None = None
    time_availability: FreeText | None = None
    symptoms_since: FreeText | None = None
    open_to_group_therapy: bool | None = None
    therapy_experience: FreeText | None = None
    current_complaints: FreeText | None = None


class PlacementRequestCreatedPayload(Contract):
    placement_request_id: Id
    patient_id: Id
    therapist_id: Id
    created_at: Instant
    patient: PatientSummary


class PlacementRequestStatusChangedPayload(Contract):
    placement_request_id: Id
    old_status: PlacementRequestStatusValue
    new_status: PlacementRequestStatusValue
    reason: FreeText | None


class PlacementRequestCancelledPayload(Contract):
    placement_request_id: Id
    reason: FreeText | None


class PlacementRequestCreated(Envelope):
    event_type: Literal["placement_request.created"]
    payload: PlacementRequestCreatedPayload


class PlacementRequestStatusChanged(Envelope):
    event_type: Literal["placement_request.status_changed"]
    payload: PlacementRequestStatusChangedPayload


class PlacementRequestCancelled(Envelope):
    event_type: Literal["placement_request.cancelled"]
    payload: PlacementRequestCancelledPayload


# --- comms.handle_patient_event --------------------------------------------------


class PatientUpdatedPayload(Contract):
    patient_id: Id
    patient: PatientSummary


class PatientErasedPayload(Contract):
    patient_id: Id


class PatientUpdated(Envelope):
    event_type: Literal["patient.updated"]
    payload: PatientUpdatedPayload


class PatientErased(Envelope):
    event_type: Literal["patient.erased"]
    payload: PatientErasedPayload


# --- Commands --------------------------------------------------------------------


class Command(Contract):
    command_id: uuid.UUID


NAMED_BEFORE = "names a request named before in this command"


def _first_repeat(ids: list[int]) -> int | None:
    """The index of the first id that appeared earlier in ``ids``, if any."""
    seen: set[int] = set()
    for index, value in enumerate(ids):
        if value in seen:
            return index
        seen.add(value)
    return None


def _refuse_repeats(field: str, ids: list[int], *, key: str | None = None) -> None:
    # One outcome per request and command: "17 accepted" and "17 rejected" in the same
    # answer has no meaning, and applying both in turn would publish both.
    index = _first_repeat(ids)
    if index is not None:
        loc: tuple[int | str, ...] = (field, index) if key is None else (field, index, key)
        raise field_error(loc, NAMED_BEFORE)


class EmailResponseOutcome(Contract):
    placement_request_id: Id
    outcome: OutcomeValue
    notes: FreeText | None


class RecordEmailResponse(Command):
    email_id: Id
    received_at: Instant
    content: FreeText | None
    outcomes: list[EmailResponseOutcome] = Field(max_length=MAX_REQUESTS_PER_MESSAGE)

    @model_validator(mode="after")
    def _one_outcome_per_request(self) -> RecordEmailResponse:
        ids = [item.placement_request_id for item in self.outcomes]
        _refuse_repeats("outcomes", ids, key="placement_request_id")
        return self


class CallRequestOutcome(Contract):
    placement_request_id: Id
    discussed: bool
    outcome: OutcomeValue | None
    notes: FreeText | None


class RecordCallOutcome(Command):
    call_id: Id
    status: Literal["completed", "failed", "cancelled"]
    occurred_at: Instant
    outcome: FreeText | None
    notes: FreeText | None
    retry_after: Day | None
    requests: list[CallRequestOutcome] = Field(max_length=MAX_REQUESTS_PER_MESSAGE)

    @model_validator(mode="after")
    def _one_outcome_per_request(self) -> RecordCallOutcome:
        ids = [item.placement_request_id for item in self.requests]
        _refuse_repeats("requests", ids, key="placement_request_id")
        return self


class QueueEmail(Command):
    therapist_id: Id
    template: Literal["follow_up", "confirmation"]
    placement_request_ids: list[Id] = Field(
        min_length=1, max_length=MAX_REQUESTS_PER_MESSAGE, json_schema_extra={"uniqueItems": True}
    )
    reply_to_email_id: Id | None

    @model_validator(mode="after")
    def _each_request_once(self) -> QueueEmail:
        _refuse_repeats("placement_request_ids", self.placement_request_ids)
        return self


class ScheduleCall(Command):
    therapist_id: Id
    placement_request_ids: list[Id] = Field(
        min_length=1, max_length=MAX_REQUESTS_PER_MESSAGE, json_schema_extra={"uniqueItems": True}
    )
    at: Instant | None
    notes: FreeText | None

    @model_validator(mode="after")
    def _each_request_once(self) -> ScheduleCall:
        _refuse_repeats("placement_request_ids", self.placement_request_ids)
        return self
