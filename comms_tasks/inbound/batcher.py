"""The worker's inbound batches: messages that arrive while the pool is busy wait, and go
to it together, to be applied in one transaction (:func:`comms_tasks.inbound.batch.apply_batch`).

Every inbound task's consumer strategy is Celery's own (``celery.worker.strategy.default``:
the request, its revocation, the task-received event, a countdown's wait) with one step
changed: where Celery hands the request to the pool, :meth:`Batcher.take` does.

- A message arriving while fewer batches are in the pool than it has processes goes to
  it at once, alone: at a low rate nothing waits. Arriving while they are all busy, it
  waits in the batcher's buffer, in arrival order (one buffer for all the inbound tasks,
  so an event is never overtaken by a command of another task name). When a batch
  returns, the buffer goes next, up to ``COMMS_INBOUND_BATCH`` messages.
- While a message waits, the consumer's prefetch is one higher (as Celery does for a
  message with a countdown), up to the batch size: the broker keeps sending, and the
  next batch fills while the pool works. Other tasks keep their one message per process.
  Not on RabbitMQ's quorum queues, whose consumer cannot change its prefetch: there it is
  the batch size per process from the start, for every task (``celeryconfig``).
- A message of a batch is acknowledged only after the batch committed (acks late), with
  Flower's task-started and task-succeeded events and its outcome as for any task.
- Whatever the batch did not apply runs on its own, as every message did before: a
  message that fails its contract (its dead letter), one that raised (retries, dead
  letter), all of a batch that met an outage or whose process died (counted starts, so a
  message that kills its process still ends as a dead letter).
- A message delivered again (``redelivered``: its worker died, or the connection was
  lost, before it was acknowledged) or a retry never waits in a batch: it runs alone,
  its start counted, as before.
- A lost broker connection (``DeadLetteringConsumer.on_close``) empties the buffer and
  forgets the batches in the pool: their messages come back from the broker.
- A ``revoke`` reaches a message while it waits (it is not applied); once its batch runs,
  ``terminate`` cannot stop it alone: it is applied with the batch, and no process is
  terminated.
- With a result backend (``COMMS_RESULT_BACKEND``) each applied message's result is
  stored, as its own run would store it.

``COMMS_INBOUND_BATCH=1`` turns batches off; so does a pool other than prefork or solo,
and the embedded default's folder broker (it has no acknowledgements: a message is gone
from its folder once delivered). A call whose args are not a list or whose kwargs are
not a mapping is kept as a dead letter (Celery would fail it outside the task's body).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.worker.request import Request
from celery.worker.state import task_ready
from celery.worker.strategy import default as default_strategy

from comms_tasks.settings import get_settings

log = logging.getLogger(__name__)

MALFORMED_CALL = (
    "the message is not a valid task message: its args must be a list and its kwargs a mapping"
)

# The pools whose callbacks run in the consumer's own thread (the hub's loop, or inline).
BATCHING_POOL_MODULES = ("celery.concurrency.prefork", "celery.concurrency.solo")


class Batcher:
    """One consumer's inbound requests on their way to the pool, shared by its tasks."""

    def __init__(self, consumer: Any, size: int) -> None:
        self.consumer = consumer
        self.size = size
        # Each waiting request with the prefetch it was given (to give back), if any.
        self.buffer: list[tuple[Request, Any]] = []
        self.in_flight = 0
        # A new one after each lost connection (reset): a batch of before then, once back,
        # touches nothing of now.
        self.generation = 0
        pool = consumer.pool
        self.processes = max(1, int(getattr(pool, "limit", None) or 1))
        self.enabled = size > 1 and type(pool).__module__ in BATCHING_POOL_MODULES

    def take(self, request: Request) -> None:
        """Where Celery's strategy would hand ``request`` to the pool."""
        if not well_formed(request):
            self._keep_malformed(request)
            return
        if not self.enabled or runs_alone(request):
            self.consumer.on_task_request(request)
            return
        held = None
        if len(self.buffer) < self.size:
            # Room for one more to wait: the broker may send the next message. Given back
            # to the same QoS (a reconnected consumer has a new one, at its own value).
            held = self.consumer.qos
            held.increment_eventually()
        self.buffer.append((request, held))
        self.flush()

    def reset(self) -> None:
        """The consumer's connection is gone (``on_close``): forget what it held.

        Its messages cannot be acknowledged on the new channel, and the broker gives them
        back: those waiting are dropped, and so, by the pool, are batches that waited for a
        process (their callbacks never come). A batch that was running still commits; its
        messages come back and are duplicates.
        """
        self.generation += 1
        self.buffer = []
        self.in_flight = 0

    def _keep_malformed(self, request: Request) -> None:
        """A call whose args are not a list or whose kwargs not a mapping: Celery's tracer
        would fail it outside the task's body, and acknowledge it with no dead letter. It
        is kept as one, as a message the worker cannot run (``stray_messages``)."""
        call = {"args": request.args, "kwargs": request.kwargs}
        # Kept (and acknowledged), or left unacknowledged while the database is away: the
        # worker's consumer is always stray_messages.DeadLetteringConsumer (celeryconfig).
        self.consumer._keep(
            request.message, request.task_name, request.task_id, MALFORMED_CALL, call
        )
        task_ready(request)

    def flush(self) -> None:
        """Hand the buffer to the pool while it has a process no batch occupies."""
        while self.buffer and self.in_flight < self.processes:
            batch, self.buffer = self.buffer[: self.size], self.buffer[self.size :]
            self._send(batch)

    def _send(self, batch: list[tuple[Request, Any]]) -> None:
        from comms_tasks.inbound.batch import Batch, apply_batch

        # Revoked (or expired) while it waited: Celery announces and acknowledges it, as
        # it would have at the pool's door.
        for request, held in [(r, h) for r, h in batch if r.revoked()]:
            if held is not None:
                held.decrement_eventually()
            batch.remove((request, held))
        if not batch:
            return
        requests = [request for request, _ in batch]
        items = [(r.task_name, r.task_id, tuple(r.args), r.kwargs) for r in requests]
        accepted: dict[str, Any] = {}

        def on_accepted(pid: int, time_accepted: float) -> None:
            accepted.update(pid=pid, at=time_accepted)

        finish = self._finisher(batch, accepted)

        def on_error(_exc_info: Any) -> None:
            # The process died, or the batch hit its time limit: each goes on its own.
            finish(None)

        task: Task = requests[0].task
        self.in_flight += 1
        try:
            self.consumer.pool.apply_async(
                apply_batch,
                (Batch(items),),
                accept_callback=on_accepted,
                callback=finish,
                error_callback=on_error,
                soft_timeout=task.soft_time_limit or task.app.conf.task_soft_time_limit,
                timeout=task.time_limit or task.app.conf.task_time_limit,
            )
        except Exception:
            self.in_flight -= 1
            log.exception("an inbound batch could not go to the pool: each message alone")
            self._each_alone(batch)

    def _finisher(
        self, batch: list[tuple[Request, Any]], accepted: dict[str, Any]
    ) -> Callable[[Any], None]:
        """What the batch's return calls: :meth:`_finish`, unless the connection it came
        on is gone since (:meth:`reset`)."""
        generation = self.generation

        def finish(outcomes: Any) -> None:
            if generation == self.generation:
                self._finish(batch, outcomes, accepted)

        return finish

    def _finish(
        self, batch: list[tuple[Request, Any]], outcomes: Any, accepted: dict[str, Any]
    ) -> None:
        self.in_flight -= 1
        if not isinstance(outcomes, list) or len(outcomes) != len(batch):
            outcomes = [None] * len(batch)
        pid = accepted.get("pid", 0)
        started = accepted.get("at", time.monotonic())
        runtime = (time.monotonic() - started) / len(batch)
        for (request, held), outcome in zip(batch, outcomes, strict=True):
            if held is not None:
                held.decrement_eventually()
            try:
                if outcome is None:
                    self.consumer.on_task_request(request)
                else:
                    # A revoke with terminate that came while the batch ran cannot stop
                    # its message (committed with the others): nothing is terminated, as
                    # Celery would terminate the process, by now busy with other work.
                    request._terminate_on_ack = None
                    request.on_accepted(pid, started)
                    request.on_success((False, repr(outcome), runtime))
            except Exception:
                # Unacknowledged, the message is delivered again (and runs alone then).
                log.exception("an inbound message of a batch could not be finished")
        self.flush()

    def _each_alone(self, batch: list[tuple[Request, Any]]) -> None:
        for request, held in batch:
            if held is not None:
                held.decrement_eventually()
            self.consumer.on_task_request(request)


def reset_batcher(consumer: Any) -> None:
    """The consumer closed its connection: its batcher, if it has one, forgets."""
    batcher = getattr(consumer, "_comms_inbound_batcher", None)
    if batcher is not None:
        batcher.reset()


def well_formed(request: Request) -> bool:
    """A call as a task takes it: args a list, kwargs a mapping. Any other is a dead letter
    (:meth:`Batcher._keep_malformed`)."""
    return isinstance(request.args, list | tuple) and isinstance(request.kwargs, dict)


def runs_alone(request: Request) -> bool:
    """A message delivered again, or a retry: run on its own, its start counted."""
    return bool(request.delivery_info.get("redelivered")) or bool(
        request.request_dict.get("retries")
    )


class _ConsumerView:
    """The consumer as Celery's strategy sees it, its hand-over to the pool the batcher's."""

    def __init__(self, consumer: Any, batcher: Batcher) -> None:
        self._consumer = consumer
        self.on_task_request = batcher.take

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def batcher_of(consumer: Any) -> Batcher:
    """The consumer's one batcher, made with its first inbound task's strategy."""
    batcher = getattr(consumer, "_comms_inbound_batcher", None)
    if batcher is None or batcher.consumer is not consumer:
        settings = get_settings()
        # The embedded default's folder broker deletes a message's file as it delivers it:
        # a message waiting in a batch would be lost with the worker. One at a time there.
        size = settings.inbound_batch if settings.broker_url is not None else 1
        batcher = Batcher(consumer, size)
        consumer._comms_inbound_batcher = batcher
    return batcher


def strategy(task: Task, app: Any, consumer: Any, **options: Any) -> Any:
    """An inbound task's strategy: Celery's default, handing over to the batcher."""
    return default_strategy(task, app, _ConsumerView(consumer, batcher_of(consumer)), **options)
