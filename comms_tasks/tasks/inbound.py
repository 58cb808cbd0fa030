"""Tasks other services call by name (CONTRACTS.md): validate, apply once, or dead-letter."""

from __future__ import annotations

from typing import Any

from celery import Task
from sqlalchemy.exc import DBAPIError

from comms_tasks import read_models
from comms_tasks.app import app
from comms_tasks.contracts import (
    HANDLE_MATCHING_EVENT,
    HANDLE_PATIENT_EVENT,
    HANDLE_THERAPIST_EVENT,
)
from comms_tasks.inbox import Applier, handle_call

# The database may be briefly unreachable (restart, failover): such a task is retried
# with backoff, never dead-lettered. IntegrityError here means a concurrent writer won a
# race on another row; a retry sees its result.
TRANSIENT_ERRORS = (DBAPIError,)
MAX_TRANSIENT_RETRIES = 12
MAX_BACKOFF_SECONDS = 120

APPLIERS: dict[str, Applier] = {
    HANDLE_THERAPIST_EVENT: read_models.apply_therapist_event,
    HANDLE_MATCHING_EVENT: read_models.apply_matching_event,
    HANDLE_PATIENT_EVENT: read_models.apply_patient_event,
}


def inbound_task_options() -> dict[str, Any]:
    """How every inbound task runs: retried on database outages, ids-only in events."""
    return {
        "autoretry_for": TRANSIENT_ERRORS,
        "retry_backoff": True,
        "retry_backoff_max": MAX_BACKOFF_SECONDS,
        "retry_jitter": True,
        "max_retries": MAX_TRANSIENT_RETRIES,
        # Flower and the worker's events show the message's ids, not its patient data.
        "Request": "comms_tasks.privacy:RedactedRequest",
    }


def inbound_task(task_name: str, applier: Applier) -> Task:
    """Register the task ``task_name``: validate the message, apply it once, or dead-letter."""

    @app.task(name=task_name, **inbound_task_options())
    def task(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return handle_call(task_name, args, kwargs, applier).as_dict()

    return task


handle_therapist_event = inbound_task(HANDLE_THERAPIST_EVENT, APPLIERS[HANDLE_THERAPIST_EVENT])
handle_matching_event = inbound_task(HANDLE_MATCHING_EVENT, APPLIERS[HANDLE_MATCHING_EVENT])
handle_patient_event = inbound_task(HANDLE_PATIENT_EVENT, APPLIERS[HANDLE_PATIENT_EVENT])
