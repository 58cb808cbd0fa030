"""A message that kills its worker process is a dead letter after a few deliveries.

``task_reject_on_worker_lost`` gives a message back to the broker when the process
running it dies (out of memory, a segfault), so that a crash loses nothing; a message
that itself causes the crash would be delivered forever. Every task of the app
(:class:`CountedTask`, the app's task class) therefore counts its starts: a row per
message and attempt (``task_id``, ``retries``) is written and committed before the body
runs and removed when the body returns or raises. Only a start that never finished
leaves its row behind, so the count is that of processes that died on the message:

- a retry (``autoretry``, an outage) is a new attempt with its own row, and its start
  removed the previous one: retries never count;
- a message given back after a broker or connection outage was either never started
  (prefetched only, not counted) or finished (its row is gone): it counts anew;
- a warm shutdown lets running tasks finish; only a cold one (or SIGKILL) counts.

A message that arrives after :data:`MAX_DELIVERIES` unfinished starts is not run again:
it becomes a dead letter ("killed its worker process 3 times"), replayable in ``comms``
(which runs it in its own process) once the cause is fixed, and is acknowledged.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Reject
from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from comms_tasks import task_starts
from comms_tasks.inbound.inbox import loggable_id
from comms_tasks.models import TaskDelivery
from comms_tasks.models.base import utcnow
from comms_tasks.task_starts import MAX_TASK_ID

log = logging.getLogger(__name__)

# Unfinished starts after which a message is not run again: one crash may be bad luck
# (another message exhausted the memory), three on the same message are the message.
MAX_DELIVERIES = 3
# What the task name column holds (the task id's: task_starts.MAX_TASK_ID).
MAX_TASK_NAME = 100


def count_start(task_name: str, task_id: str, retries: int) -> int:
    """Record one more start of the message's attempt, committed; how many there were."""
    from comms_tasks.db import transaction

    now = utcnow()
    with transaction() as session:
        dialect = session.get_bind().dialect.name
        insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
        statement = insert(TaskDelivery).values(
            task_id=task_id[:MAX_TASK_ID],
            retries=retries,
            task_name=task_name[:MAX_TASK_NAME],
            deliveries=1,
            last_delivered_at=now,
        )
        statement = statement.on_conflict_do_update(
            index_elements=[TaskDelivery.task_id, TaskDelivery.retries],
            set_={"deliveries": TaskDelivery.deliveries + 1, "last_delivered_at": now},
        )
        count: int = session.execute(statement.returning(TaskDelivery.deliveries)).scalar_one()
        return count


def forget(task_id: str) -> None:
    """The message's run finished (returned, raised or was retried): remove its starts."""
    from comms_tasks.db import transaction

    with transaction() as session:
        session.execute(delete(TaskDelivery).where(TaskDelivery.task_id == task_id[:MAX_TASK_ID]))


def killer_reason(crashes: int) -> str:
    return f"killed its worker process {crashes} times: not run again"


def store_killer(task_name: str, task_id: str, args: Any, kwargs: Any, crashes: int) -> Any:
    """Keep the message as a dead letter; what the task returns in place of its body."""
    from comms_tasks.inbound.inbox import store_failure, store_stray
    from comms_tasks.privacy.task_reprs import INBOUND_TASK_NAMES

    reason = killer_reason(crashes)
    if task_name in INBOUND_TASK_NAMES:
        # Kept as any inbound message that could not be applied: replayable.
        return store_failure(task_name, tuple(args), dict(kwargs), reason).as_dict()
    letter_id = store_stray(task_name, task_id, reason, {"args": list(args), "kwargs": kwargs})
    log.error(
        "dead letter %s for %s (task %s): %s", letter_id, task_name, loggable_id(task_id), reason
    )
    return {"result": "dead_letter", "dead_letter_id": letter_id}


class CountedTask(Task):
    """A task whose starts are counted, so that a message killing its worker stops."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            return super().__call__(*args, **kwargs)
        if request.is_eager or not isinstance(request.id, str):
            # The tracer pushed this run's request already; Task.__call__ would push a
            # bare one over it (no id, no retries).
            return self.run(*args, **kwargs)
        from comms_tasks.db import one_connection
        from comms_tasks.privacy.task_reprs import INBOUND_TASK_NAMES

        # An inbound message is two short transactions (its count, then the message).
        if self.name in INBOUND_TASK_NAMES:
            with one_connection():
                return self._counted_run(request.id, int(request.retries or 0), args, kwargs)
        return self._counted_run(request.id, int(request.retries or 0), args, kwargs)

    def _counted_run(self, task_id: str, retries: int, args: Any, kwargs: Any) -> Any:
        try:
            starts = count_start(self.name, task_id, retries)
        except SQLAlchemyError as exc:
            # The database is away: run as if uncounted; the task meets the outage itself.
            log.warning(
                "could not count the start of %s[%s]: %s",
                self.name,
                loggable_id(task_id),
                type(exc).__name__,
            )
            return self.run(*args, **kwargs)
        if starts > MAX_DELIVERIES:
            try:
                outcome = store_killer(self.name, task_id, args, kwargs, starts - 1)
            except SQLAlchemyError as exc:
                # Not stored: given back to the broker, to be dead-lettered next time.
                raise Reject(f"no dead letter stored: {type(exc).__name__}", requeue=True) from None
            self._forget(task_id)
            return outcome
        start = task_starts.Start(task_id)
        token = task_starts.running.set(start)
        try:
            return self.run(*args, **kwargs)
        finally:
            task_starts.running.reset(token)
            if not start.forgotten:
                self._forget(task_id)

    def _forget(self, task_id: str) -> None:
        try:
            forget(task_id)
        except SQLAlchemyError as exc:
            # A row left behind counts one start too many, at most once per outage.
            log.warning(
                "could not clear the starts of %s[%s]: %s",
                self.name,
                loggable_id(task_id),
                type(exc).__name__,
            )
