"""Several inbound messages applied in one transaction: the pool side of the worker's
batches (:mod:`comms_tasks.inbound.batcher` hands them over).

Each message is validated, its ``processed_messages`` row claimed and its read model
changed exactly as :func:`comms_tasks.inbound.inbox.handle` does, one after the other in
arrival order, and the whole batch commits once. Whatever is not the plain case is left
to the message's own run (``None`` in the outcomes), which validates, applies, retries
and dead-letters it as it always has: a message that fails its contract, one whose
applier raises, every message of a batch that met an outage. A message that raised is
taken out and the rest is tried again in a new transaction, a few times; then the rest
too runs on its own.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from comms_tasks.app import app
from comms_tasks.db import one_connection, transaction
from comms_tasks.inbound import failures
from comms_tasks.inbound.inbox import (
    Applier,
    Outcome,
    claim_all,
    message_id_of,
    unpack_arguments,
    validate,
)
from comms_tasks.task_outcomes import log_outcome

log = logging.getLogger(__name__)

# A batch is tried again without the message that raised at most this many times.
MAX_ATTEMPTS = 3

# One message as the worker hands it over: its task name, task id, args and kwargs.
Item = tuple[str, str, tuple[Any, ...], dict[str, Any]]
# A message ready to apply: its place in the batch, task name, message id, the validated
# message and its applier.
Ready = tuple[int, str, str, Any, Applier]

# What an attempt that cannot single out one message returns: all of the rest alone.
EVERY_ONE = -1


class Batch:
    """The messages of a batch on their way to the pool, shown by their number only.

    The pool logs what it is handed (Celery's ``TaskPool: Apply ... (args: ...)`` at
    DEBUG): a message's arguments hold patient data, which no log line may show.
    """

    __slots__ = ("items",)

    def __init__(self, items: list[Item]) -> None:
        self.items = items

    def __repr__(self) -> str:
        return f"<inbound batch of {len(self.items)} messages>"


def apply_batch(batch: Batch) -> list[dict[str, Any] | None]:
    """Each message's outcome (as its task returns it), or ``None``: to run on its own."""
    from comms_tasks.inbound.runner import APPLIERS

    items = batch.items
    started = time.monotonic()
    outcomes: list[dict[str, Any] | None] = [None] * len(items)
    ready: list[Ready] = []
    for index, (task_name, _, args, kwargs) in enumerate(items):
        applier = APPLIERS.get(task_name)
        if applier is None:
            continue
        try:
            message = validate(task_name, unpack_arguments(task_name, args, kwargs))
        except Exception:  # noqa: BLE001, S112 - its own run keeps it as a dead letter
            continue
        ready.append((index, task_name, message_id_of(message), message, applier))
    with one_connection():
        for _ in range(MAX_ATTEMPTS):
            if not ready:
                break
            failed = _apply_together(ready, outcomes)
            if failed is None or failed == EVERY_ONE:
                break
            ready = [entry for entry in ready if entry[0] != failed]
    # Each applied message's outcome line, as its own run would write it; what did not
    # commit (still failing after the attempts, too) writes its own when it runs alone.
    duration_ms = round((time.monotonic() - started) * 1000, 1)
    for (task_name, task_id, _, _), outcome in zip(items, outcomes, strict=True):
        if outcome is not None:
            log_outcome(task_name, task_id, "SUCCESS", duration_ms, outcome)
            _store_result(task_name, task_id, outcome)
    return outcomes


def _store_result(task_name: str, task_id: str, outcome: dict[str, Any]) -> None:
    """With a result backend (``COMMS_RESULT_BACKEND``), the message's result, as its own
    run would store it; bookkeeping only: the message is applied whatever happens here."""
    task = app.tasks[task_name]
    if task.ignore_result:
        return
    try:
        task.backend.mark_as_done(task_id, outcome)
    except Exception:
        log.warning("the result of %s[%s] could not be stored", task_name, task_id, exc_info=True)


def _apply_together(ready: list[Ready], outcomes: list[dict[str, Any] | None]) -> int | None:
    """Apply ``ready`` in one transaction; ``None`` if it committed, else what failed."""
    results: dict[int, dict[str, Any]] = {}
    current: int | None = None
    try:
        with transaction() as session:
            # Every message's row first, in one statement: a concurrent worker applying
            # one of them waits on its key, then finds it taken, as with one message.
            claimed = claim_all(
                session, [(message_id, name) for _, name, message_id, _, _ in ready]
            )
            for index, _, message_id, message, applier in ready:
                current = index
                if message_id in claimed:
                    claimed.discard(message_id)  # the same id again in the batch: a duplicate
                    applier(session, message)
                    results[index] = Outcome("applied", message_id).as_dict()
                else:
                    results[index] = Outcome("duplicate", message_id).as_dict()
            # The commit failing is not one message's doing.
            current = None
    except Exception as exc:  # noqa: BLE001 - every message still has its own run
        if current is None or failures.is_transient(exc) or isinstance(exc, SoftTimeLimitExceeded):
            return EVERY_ONE
        return current
    for index, outcome in results.items():
        outcomes[index] = outcome
    return None
