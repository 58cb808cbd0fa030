"""When each scheduled task last finished: recorded by the worker, shown by ``comms status``."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from comms_tasks.local_time import local_iso
from comms_tasks.models import TaskRun
from comms_tasks.models.base import utcnow
from schedules import BEAT_HEADER, beat_schedule

log = logging.getLogger(__name__)

SCHEDULED_TASKS = frozenset(entry["task"] for entry in beat_schedule.values())


def record_run(session: Session, task_name: str, state: str) -> None:
    """Upsert the task's last run; one row per task, however many workers."""
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    now = utcnow()
    statement = insert(TaskRun).values(task_name=task_name, last_finished_at=now, last_state=state)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[TaskRun.task_name],
            set_={"last_finished_at": now, "last_state": state, "runs": TaskRun.runs + 1},
        )
    )


def last_runs(session: Session) -> dict[str, dict[str, Any]]:
    runs = {row.task_name: row for row in session.scalars(select(TaskRun))}
    return {
        name: {
            # Local time with its offset: what operators read (comms status).
            "last_finished_at": local_iso(runs[name].last_finished_at) if name in runs else None,
            "last_state": runs[name].last_state if name in runs else None,
        }
        for name in sorted(SCHEDULED_TASKS)
    }


def started_by_beat(task: Any) -> bool:
    """Whether the task's current run was published by beat (its entry's header)."""
    request = getattr(task, "request", None)
    headers = getattr(request, "headers", None) or {}
    return bool(headers.get(BEAT_HEADER) or getattr(request, BEAT_HEADER, False))


@signals.task_postrun.connect
def _remember_scheduled_run(
    task: Any = None,
    state: str | None = None,
    kwargs: dict[str, Any] | None = None,
    **_signal: Any,
) -> None:
    name = getattr(task, "name", None)
    if not isinstance(name, str) or name not in SCHEDULED_TASKS:
        return
    if kwargs and kwargs.get("helper"):
        # A helper a run started to share its work is part of that run, not one of its own.
        return
    if not started_by_beat(task):
        # The same task started after a command, by a chain or by an operator: counting it
        # would keep the clock moving while beat is down (``comms status`` would hide it).
        return
    from comms_tasks.db import transaction

    try:
        with transaction() as session:
            record_run(session, name, state or "UNKNOWN")
    except SQLAlchemyError:
        # Bookkeeping only: a failure here must not turn a task's success into an error.
        log.warning("could not record the run of %s", name, exc_info=True)
