"""The Celery app, configured from ``celeryconfig`` (which reads the settings)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init

import comms_tasks.logs
import comms_tasks.task_runs  # noqa: F401 - records when scheduled tasks ran

app = Celery("comms_tasks")
app.config_from_object("celeryconfig")


@worker_process_init.connect
def _fresh_connections_after_fork(**_kwargs: Any) -> None:
    # A forked pool process must not reuse the parent's database connections.
    from comms_tasks.db import reset_engine

    reset_engine()
