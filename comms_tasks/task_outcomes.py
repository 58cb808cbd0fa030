"""The one log line of a task's outcome (logger ``comms_tasks.tasks``): its name, id,
state, duration and the ids and counts of its result, never more.

Foundation: the worker writes it for every task it runs (``worker.logs``), and the
inbound batches (``inbound.batch``) for each message they apply.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("comms_tasks.tasks")

# Result keys that identify entities and may be logged.
ID_KEYS = ("message_id", "dead_letter_id", "email_id", "call_id", "result")
COUNT_SUFFIXES = ("queued", "sent", "failed", "published", "pending", "scheduled", "marked")


def loggable_ids(result: Any) -> dict[str, Any]:
    """The ids and counts of a task's result: ids and numbers only."""
    if not isinstance(result, dict):
        return {}
    return {
        key: value
        for key, value in result.items()
        if (key in ID_KEYS or key.endswith(COUNT_SUFFIXES) or key in COUNT_SUFFIXES)
        and isinstance(value, int | str | None)
        and not (isinstance(value, str) and len(value) > 100)
    }


def log_outcome(
    name: str, task_id: str | None, state: str | None, duration_ms: float | None, result: Any
) -> None:
    """Log how a task's run ended."""
    ids = loggable_ids(result)
    level = logging.INFO if state == "SUCCESS" else logging.WARNING
    log.log(
        level,
        "%s[%s] %s in %s ms %s",
        name,
        task_id,
        state,
        duration_ms,
        " ".join(f"{key}={value}" for key, value in ids.items()),
        extra={
            "task": name,
            "task_id": task_id,
            "state": state,
            "duration_ms": duration_ms,
            "ids": ids,
        },
    )
