"""Thin Celery tasks, one module per pipeline stage. Importing this registers them all."""

from comms_tasks.contracts import (
    QUEUE_EMAIL,
    RECORD_CALL_OUTCOME,
    RECORD_EMAIL_RESPONSE,
    SCHEDULE_CALL,
)
from comms_tasks.inbound.inbox import Applier
from comms_tasks.tasks import batching, responses
from comms_tasks.calls import tasks
from comms_tasks.events import outbox
from comms_tasks.privacy import retention
from comms_tasks.projections import tasks
from comms_tasks.emails import tasks

# What applies each inbound message: the tasks use it, and so does a dead-letter replay.
APPLIERS: dict[str, Applier] = {
    **tasks.APPLIERS,
    RECORD_EMAIL_RESPONSE: responses.apply_email_response,
    QUEUE_EMAIL: responses.apply_queue_email,
    SCHEDULE_CALL: tasks.apply_schedule_call,
    RECORD_CALL_OUTCOME: tasks.apply_call_outcome,
}

__all__ = [
    "APPLIERS",
    "batching",
    "calls",
    "inbound",
    "outbox",
    "responses",
    "retention",
    "sending",
]
