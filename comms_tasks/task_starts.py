"""The counted start of the task running in this process (``worker.deliveries``), and how a
task whose work is one transaction removes it with that work.

Foundation, so that a stage (the inbound inbox) can hand its transaction over without
importing the worker's hooks, which build on the stages.
"""

from __future__ import annotations

import contextvars
import dataclasses

from sqlalchemy import delete
from sqlalchemy.orm import Session

from comms_tasks.db import after_commit
from comms_tasks.models import TaskDelivery

# What the table's key column holds; a longer task id (a stranger's) is cut.
MAX_TASK_ID = 200


@dataclasses.dataclass
class Start:
    """The counted start of the run in progress in this process."""

    task_id: str
    forgotten: bool = False


running: contextvars.ContextVar[Start | None] = contextvars.ContextVar(
    "comms_counted_start", default=None
)


def forget_on_commit(session: Session) -> None:
    """Remove the running task's starts in ``session``'s transaction, with its work.

    For a task whose work is one transaction (an inbound message): the starts go when the
    work commits, and the run spares the transaction of its own ``forget``. Should the
    transaction roll back, the run forgets its starts as any other does.
    """
    start = running.get()
    if start is None or start.forgotten:
        return
    session.execute(delete(TaskDelivery).where(TaskDelivery.task_id == start.task_id[:MAX_TASK_ID]))

    def forgotten() -> None:
        start.forgotten = True

    after_commit(session, forgotten)
