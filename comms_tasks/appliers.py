"""What applies each inbound message, by task name: the stages' appliers in one table.

The tasks use their own; a dead-letter replay looks the message's task up here. Wiring
only: it imports the stages' tasks modules, and only the worker's plumbing, the ``comms``
command and tests import it.
"""

from __future__ import annotations

from comms_tasks.calls import tasks as call_tasks
from comms_tasks.emails import tasks as email_tasks
from comms_tasks.inbound.inbox import Applier
from comms_tasks.projections import tasks as upstream_tasks
from comms_tasks.task_names import (
    QUEUE_EMAIL,
    RECORD_CALL_OUTCOME,
    RECORD_EMAIL_RESPONSE,
    SCHEDULE_CALL,
)

APPLIERS: dict[str, Applier] = {
    **upstream_tasks.APPLIERS,
    RECORD_EMAIL_RESPONSE: email_tasks.apply_email_response,
    QUEUE_EMAIL: email_tasks.apply_queue_email,
    SCHEDULE_CALL: call_tasks.apply_schedule_call,
    RECORD_CALL_OUTCOME: call_tasks.apply_call_outcome,
}
