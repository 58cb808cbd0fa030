"""Recording a claim's send results from a thread of its own, one commit per result.

The connection sends message N+1 while this thread commits the result of message N;
before the server may accept N+1 (the end of its DATA), the sender waits for that commit
(:meth:`ResultRecorder.wait`, the sender's ``before_handover``). So at most one message
per connection is ever accepted by the server and not yet recorded: a worker killed at
any moment sends at most that one again after the lease.

On PostgreSQL a delivered result is one statement on the one connection the thread
takes for the claim, in autocommit mode (:func:`comms_tasks.db.autocommit_connection`):
one round trip per result, its own commit, durable as any other. A failure (rare:
several statements) and every result on SQLite is a transaction of its own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import random
import threading
from collections.abc import Callable, Sequence

from sqlalchemy import Connection

from comms_tasks.db import autocommit_connection, transaction
from comms_tasks.emails import send_results
from comms_tasks.mail.message import OutgoingMessage
from comms_tasks.mail.sender import SendResult
from comms_tasks.models.base import utcnow


class RecordingFailedError(RuntimeError):
    """A result could not be recorded (e.g. the database went away); sending stops."""


_DONE = None


def _through_interruptions(wait: Callable[[], object]) -> BaseException | None:
    """``wait()`` until it returns, however often an exception raised into this thread
    (the soft time limit) interrupts it; the last interruption, for the caller to raise."""
    interrupted: BaseException | None = None
    while True:
        try:
            wait()
            return interrupted
        except BaseException as exc:  # noqa: BLE001 - the caller raises it
            interrupted = exc


class ResultRecorder:
    """Records results as :meth:`add` hands them over; ``with`` it around one claim's send.

    Leaving the ``with`` block waits until every result handed over is committed, however
    the block ends: what the server accepted is recorded before anything else happens.
    ``unrecorded`` and ``counts`` are read once the block is left.
    """

    def __init__(
        self,
        messages: Sequence[OutgoingMessage],
        counts: dict[str, int],
        rng: random.Random,
        lease: dt.datetime,
    ):
        self.unrecorded = {message.email_id for message in messages}
        # What a delivered email's event names, from the claim.
        self._sent = {m.email_id: (m.therapist_id, m.message_id) for m in messages}
        self.lease = lease  # the claim's (delivery.lease_of_claim): only its emails
        self.counts = counts
        self._rng = rng
        self._results: queue.Queue[tuple[SendResult, dt.datetime] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._record_each, name="send-results")
        self._finished = threading.Event()

    def __enter__(self) -> ResultRecorder:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *_exc: object) -> None:
        self._results.put(_DONE)
        # The soft time limit may strike while the last result is being committed: wait
        # for it all the same (the hard limit is the backstop), then go on with the
        # interruption, so that nothing accepted is released unrecorded. An event, not
        # Thread.join: a join interrupted once returns at once after (CPython marks the
        # thread stopped, bpo-45274).
        interrupted = _through_interruptions(self._finished.wait)
        self._thread.join()
        if interrupted is not None:
            raise interrupted
        if exc_type is None:
            self._raise_if_failed()

    def add(self, result: SendResult) -> None:
        self._raise_if_failed()
        self._results.put((result, utcnow()))

    def wait(self) -> None:
        """Until every result handed over is committed."""
        self._results.join()
        self._raise_if_failed()

    def settle(self) -> None:
        """Until every result handed over is committed, however often interrupted (the
        soft time limit); then the interruption, or the recording's failure.

        The sender calls it before it closes its connection: with the connection gone,
        an accepted message not yet recorded would be one no open connection accounts
        for.
        """
        interrupted = _through_interruptions(self._results.join)
        if interrupted is not None:
            raise interrupted
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RecordingFailedError(f"a send result was not recorded: {self._error}")

    def _record_each(self) -> None:
        try:
            self._record_until_done()
        finally:
            self._finished.set()

    def _record_until_done(self) -> None:
        # One connection for the whole claim: no pool checkout (and ping) per result.
        with contextlib.ExitStack() as stack:
            opened = False  # at the first result
            statements: Connection | None = None
            while True:
                item = self._results.get()
                try:
                    if item is _DONE:
                        return
                    if self._error is None:
                        if not opened:
                            statements = stack.enter_context(autocommit_connection())
                            opened = True
                        self._record(statements, item)
                except Exception as exc:  # noqa: BLE001 - handed to the sending thread
                    self._error = exc
                finally:
                    self._results.task_done()

    def _record(self, statements: Connection | None, item: tuple[SendResult, dt.datetime]) -> None:
        result, at = item
        if statements is not None and result.delivered:
            therapist_id, message_id = self._sent[result.email_id]
            recorded = send_results.record_delivered(
                statements, result.email_id, therapist_id, message_id, at, self.lease
            )
        else:
            with transaction() as session:
                recorded = send_results.record_results(session, [item], self._rng, self.lease)
        self.unrecorded.discard(result.email_id)
        for each in recorded:
            self.counts[each.status.value] = self.counts.get(each.status.value, 0) + 1
