"""Logging: one line per task outcome, as text or JSON (``COMMS_LOG_FORMAT``).

The line names the task, its id, its outcome, its duration and the entity ids of its
result (email, call, dead letter, message ids) — never arguments, which for inbound
messages hold patient data.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from celery import signals

from comms_tasks.settings import Settings, get_settings

log = logging.getLogger("comms_tasks.tasks")

# Result keys that identify entities and may be logged.
ID_KEYS = ("message_id", "dead_letter_id", "email_id", "call_id", "result")
COUNT_SUFFIXES = ("queued", "sent", "failed", "published", "pending", "scheduled", "marked")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Extra attributes our lines carry, in the order JSON output shows them.
EXTRA_FIELDS = ("task", "task_id", "state", "duration_ms", "ids")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in EXTRA_FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Our outcome line replaces Celery's "Task ... succeeded: <result>" line.
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)


@signals.setup_logging.connect
def _setup_logging(**_kwargs: Any) -> None:
    configure(get_settings())


_started: dict[str, float] = {}


@signals.task_prerun.connect
def _task_started(task_id: str | None = None, **_kwargs: Any) -> None:
    if task_id:
        _started[task_id] = time.monotonic()


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


@signals.task_postrun.connect
def _task_finished(
    task_id: str | None = None,
    task: Any = None,
    retval: Any = None,
    state: str | None = None,
    **_kwargs: Any,
) -> None:
    started = _started.pop(task_id or "", None)
    duration_ms = round((time.monotonic() - started) * 1000, 1) if started else None
    name = getattr(task, "name", "?")
    ids = loggable_ids(retval)
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
