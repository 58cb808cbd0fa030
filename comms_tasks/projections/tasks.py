"""The tasks other services call with upstream events: therapists, requests, patients."""

from __future__ import annotations

from comms_tasks.inbound.inbox import Applier
from comms_tasks.inbound.runner import inbound_task
from comms_tasks.projections import upstream
from comms_tasks.task_names import (
    HANDLE_MATCHING_EVENT,
    HANDLE_PATIENT_EVENT,
    HANDLE_THERAPIST_EVENT,
)

APPLIERS: dict[str, Applier] = {
    HANDLE_THERAPIST_EVENT: upstream.apply_therapist_event,
    HANDLE_MATCHING_EVENT: upstream.apply_matching_event,
    HANDLE_PATIENT_EVENT: upstream.apply_patient_event,
}


handle_therapist_event = inbound_task(HANDLE_THERAPIST_EVENT, APPLIERS[HANDLE_THERAPIST_EVENT])
handle_matching_event = inbound_task(HANDLE_MATCHING_EVENT, APPLIERS[HANDLE_MATCHING_EVENT])
handle_patient_event = inbound_task(HANDLE_PATIENT_EVENT, APPLIERS[HANDLE_PATIENT_EVENT])
