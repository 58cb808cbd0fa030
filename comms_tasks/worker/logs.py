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
from comms_tasks.task_outcomes import log_outcome

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
    log_outcome(getattr(task, "name", "?"), task_id, state, duration_ms, retval)
