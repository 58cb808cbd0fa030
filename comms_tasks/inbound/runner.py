"""How a task other services call by name runs: validate, apply once, retry an outage, or
dead-letter what still fails. Every stage declares its inbound tasks with :func:`inbound_task`."""

from __future__ import annotations

from typing import Any, NoReturn

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.exc import IntegrityError

from comms_tasks.app import app
from comms_tasks.inbound import failures
from comms_tasks.inbound.inbox import Applier, handle_call, store_failure, store_unstorable

# The database may be briefly unreachable (restart, failover) or a transaction lose a
# race (serialization failure, deadlock): such a task is retried with backoff, over a
# few minutes. An IntegrityError usually means a concurrent writer won a race on another
# row, which a retry sees; it gets a few retries. Anything else fails the same way every
# time. Whatever still fails after its retries becomes a dead letter: never dropped.
MAX_TRANSIENT_RETRIES = 12
MAX_RACE_RETRIES = 3
MAX_BACKOFF_SECONDS = 120

# Every inbound task's applier by task name, for the worker's batches (inbound.batch).
APPLIERS: dict[str, Applier] = {}


def inbound_task_options() -> dict[str, Any]:
    """How every inbound task runs: bound (it retries itself, :func:`run_inbound`),
    ids-only in events."""
    return {
        "bind": True,
        # The retry budgets are :func:`retries_allowed`'s; Celery's own limit is off, so
        # that a dead letter that cannot be written yet is retried, not lost.
        "max_retries": None,
        # Flower and the worker's events show the message's ids, not its patient data.
        "Request": "comms_tasks.privacy.task_reprs:RedactedRequest",
        # Messages that arrive while the pool is busy are applied together (inbound.batcher).
        "Strategy": "comms_tasks.inbound.batcher:strategy",
    }


def inbound_task(task_name: str, applier: Applier) -> Task:
    """Register the task ``task_name``: validate the message, apply it once, or dead-letter."""
    APPLIERS[task_name] = applier

    @app.task(name=task_name, **inbound_task_options())
    def task(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return run_inbound(self, task_name, args, kwargs, applier)

    return task


def retries_allowed(exc: BaseException) -> int:
    """How many times a message that failed with ``exc`` is tried again."""
    if failures.is_transient(exc) or isinstance(exc, SoftTimeLimitExceeded):
        return MAX_TRANSIENT_RETRIES
    if isinstance(exc, IntegrityError):
        return MAX_RACE_RETRIES
    return 0


def run_inbound(
    task: Task, task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any], applier: Applier
) -> dict[str, Any]:
    """Apply the message; retry an outage; make anything else a dead letter."""
    retries = task.request.retries or 0
    try:
        return handle_call(task_name, args, kwargs, applier).as_dict()
    except Exception as exc:  # noqa: BLE001 - every failure is retried or dead-lettered
        failure = exc
    if retries < retries_allowed(failure):
        countdown = get_exponential_backoff_interval(
            factor=1, retries=retries, maximum=MAX_BACKOFF_SECONDS, full_jitter=True
        )
        retry(task, failure, countdown)
    reason = failures.failure_reason(failure, retries)
    try:
        return store_failure(task_name, args, kwargs, reason).as_dict()
    except Exception as exc:  # noqa: BLE001 - an outage is retried, anything else kept below
        failure = exc
    if failures.is_transient(failure):
        # The database is still away: the message stays in the queue, not lost.
        retry(task, failure, MAX_BACKOFF_SECONDS)
    # The letter itself cannot be written (what it holds, not an outage): a minimal one
    # naming the task, the message id and the cause is kept instead.
    unstorable = failure
    try:
        return store_unstorable(task_name, args, kwargs, unstorable).as_dict()
    except Exception as exc:
        if not failures.is_transient(exc):
            raise
        failure = exc
    retry(task, failure, MAX_BACKOFF_SECONDS)


class RetriedOutage(Exception):
    """What a retry reports (task-retried event, result backend): the cause's class only.

    The exception itself carries the server's message and a traceback, which may quote
    values of the message; neither may reach an event or Flower.
    """


def retry(task: Task, exc: BaseException, countdown: float) -> NoReturn:
    """Retry ``task`` in ``countdown`` seconds, reporting ``exc`` by its class only.

    Called outside any ``except`` block, so that the reported traceback chains no
    exception with its message.
    """
    raise task.retry(exc=RetriedOutage(failures.cause_of(exc)), countdown=countdown)
