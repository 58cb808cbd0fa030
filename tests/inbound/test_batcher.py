"""The consumer's side of inbound batches (:class:`comms_tasks.inbound.batcher.Batcher`),
step by step: when a message waits, when a batch goes, the prefetch it takes and gives
back, and what becomes of each message.

Celery's solo pool runs what it is handed at once, in this process, on the committed
database: a batch goes and returns inside ``take``. The pool is made busy by holding its
one slot (``in_flight``), as a batch under way does. The requests stand in for Celery's
(a broker message each would need a broker): they carry what the batcher reads and
record what it calls.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery.concurrency.solo import TaskPool
from kombu.common import QoS
from sqlalchemy import Engine

from comms_tasks.app import app
from comms_tasks.inbound.batcher import MALFORMED_CALL, Batcher
from tests import factories as f
from tests.inbound.test_inbound_tasks import THERAPIST, therapist


class FakeRequest:
    def __init__(self, event: dict[str, Any], *, redelivered: bool = False, retries: int = 0):
        self.task_name = THERAPIST
        self.task_id = str(uuid.uuid4())
        self.args: tuple[Any, ...] = ()
        self.kwargs = {"event": event}
        self.delivery_info = {"redelivered": redelivered}
        self.request_dict = {"retries": retries}
        self.message = None
        self.id = self.task_id
        self.task = app.tasks[THERAPIST]
        self.is_revoked = False
        self._terminate_on_ack: tuple[Any, ...] | None = None
        self.calls: list[str] = []
        self.results: list[str] = []

    def revoked(self) -> bool:
        if self.is_revoked:
            self.calls.append("revoked")
        return self.is_revoked

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        # Celery's terminates the process ``pid`` here when a revoke asked for it.
        self.calls.append("accepted" if self._terminate_on_ack is None else "terminated")

    def on_success(self, failed_retval_runtime: tuple[bool, str, float]) -> None:
        self.calls.append("succeeded")
        self.results.append(failed_retval_runtime[1])


class FakeConsumer:
    def __init__(self) -> None:
        self.pool = TaskPool()
        self.alone: list[FakeRequest] = []
        self.kept: list[tuple[str, str, Any]] = []
        self.qos = QoS(lambda prefetch_count: None, 1)

    def on_task_request(self, request: FakeRequest) -> None:
        self.alone.append(request)

    def _keep(self, message: Any, task_name: str, task_id: str, reason: str, call: Any) -> bool:
        # DeadLetteringConsumer's: stores the letter and acknowledges the message.
        self.kept.append((task_id, reason, call))
        return True


def busy(consumer: FakeConsumer, size: int = 50) -> Batcher:
    """A batcher whose one process has a batch under way."""
    batcher = Batcher(consumer, size)
    batcher.in_flight = 1
    return batcher


def batch_returned(batcher: Batcher) -> None:
    """The batch under way returned: the buffer goes to the pool."""
    batcher.in_flight = 0
    batcher.flush()


@pytest.fixture
def consumer(committed_db: Engine) -> FakeConsumer:
    return FakeConsumer()


def test_a_message_to_an_idle_pool_goes_at_once_and_is_acknowledged_after(
    consumer: FakeConsumer, committed_db: Engine
) -> None:
    batcher = Batcher(consumer, 50)
    request = FakeRequest(f.therapist_upserted(1))

    batcher.take(request)  # type: ignore[arg-type]

    assert request.calls == ["accepted", "succeeded"]
    assert "'result': 'applied'" in request.results[0]
    assert therapist(committed_db, 1) is not None
    assert consumer.alone == []
    assert consumer.qos.value == 1
    assert batcher.buffer == []


def test_messages_wait_while_the_pool_is_busy_and_go_together(
    consumer: FakeConsumer, committed_db: Engine
) -> None:
    batcher = Batcher(consumer, 3)
    batcher.in_flight = 1  # the one process has a batch
    requests = [FakeRequest(f.therapist_upserted(n)) for n in range(10, 15)]

    for request in requests:
        batcher.take(request)  # type: ignore[arg-type]

    # Each waiting message raised the prefetch by one, up to the batch size.
    assert [request for request, _ in batcher.buffer] == requests
    assert consumer.qos.value == 1 + 3
    assert all(request.calls == [] for request in requests)

    batcher.in_flight = 0  # the batch under way returned
    batcher.flush()

    assert all(request.calls == ["accepted", "succeeded"] for request in requests)
    assert {n for n in range(10, 15) if therapist(committed_db, n)} == set(range(10, 15))
    # Every raise given back, once.
    assert consumer.qos.value == 1
    assert batcher.buffer == []
    assert batcher.in_flight == 0


def test_a_redelivered_message_or_a_retry_runs_alone(consumer: FakeConsumer) -> None:
    batcher = Batcher(consumer, 50)
    redelivered = FakeRequest(f.therapist_upserted(21), redelivered=True)
    retried = FakeRequest(f.therapist_upserted(22), retries=1)

    batcher.take(redelivered)  # type: ignore[arg-type]
    batcher.take(retried)  # type: ignore[arg-type]

    assert consumer.alone == [redelivered, retried]
    assert redelivered.calls == retried.calls == []
    assert consumer.qos.value == 1


def test_what_a_batch_does_not_apply_goes_on_alone_in_its_order(
    consumer: FakeConsumer, committed_db: Engine
) -> None:
    batcher = busy(consumer)
    bad = FakeRequest(f.therapist_upserted(31, email="a@b.de\r\nBcc: c@d.de"))
    good = FakeRequest(f.therapist_upserted(32))
    unknown = FakeRequest(f.status_changed(9999, "in_progress"))
    unknown.task_name = "comms.handle_matching_event"
    for request in (bad, good, unknown):
        batcher.take(request)  # type: ignore[arg-type]

    batch_returned(batcher)

    assert consumer.alone == [bad, unknown]
    assert bad.calls == unknown.calls == []
    assert good.calls == ["accepted", "succeeded"]
    assert therapist(committed_db, 32) is not None
    assert consumer.qos.value == 1


def test_a_message_revoked_while_it_waited_is_left_to_celery(
    consumer: FakeConsumer, committed_db: Engine
) -> None:
    batcher = busy(consumer)
    revoked = FakeRequest(f.therapist_upserted(41))
    kept = FakeRequest(f.therapist_upserted(42))
    batcher.take(revoked)  # type: ignore[arg-type]
    batcher.take(kept)  # type: ignore[arg-type]
    revoked.is_revoked = True

    batch_returned(batcher)

    # Celery's revoked() announces and acknowledges it; the batch does not apply it.
    assert revoked.calls == ["revoked"]
    assert therapist(committed_db, 41) is None
    assert kept.calls == ["accepted", "succeeded"]
    assert consumer.qos.value == 1


def test_a_batch_whose_process_died_runs_each_message_alone(consumer: FakeConsumer) -> None:
    batcher = Batcher(consumer, 50)
    requests = [FakeRequest(f.therapist_upserted(n)) for n in (51, 52)]
    batch = [(request, None) for request in requests]
    batcher.in_flight = 1

    # What the pool's error callback does when the process running the batch is lost.
    batcher._finish(batch, None, {})  # type: ignore[arg-type]

    assert consumer.alone == requests
    assert batcher.in_flight == 0


def test_batches_are_off_with_a_batch_size_of_one(consumer: FakeConsumer) -> None:
    batcher = Batcher(consumer, 1)
    request = FakeRequest(f.therapist_upserted(61))

    batcher.take(request)  # type: ignore[arg-type]

    assert consumer.alone == [request]


def test_a_revoke_with_terminate_during_its_batch_terminates_no_process(
    consumer: FakeConsumer, committed_db: Engine
) -> None:
    batcher = busy(consumer)
    request = FakeRequest(f.therapist_upserted(71))
    batcher.take(request)  # type: ignore[arg-type]
    # revoke(terminate=True) of a request Celery counts as running, before it is accepted.
    request._terminate_on_ack = (consumer.pool, "SIGTERM")

    batch_returned(batcher)

    # Applied with its batch; the process, by now another message's, is left alone.
    assert request.calls == ["accepted", "succeeded"]
    assert therapist(committed_db, 71) is not None


def test_after_a_lost_connection_the_batcher_starts_afresh(
    consumer: FakeConsumer, committed_db: Engine
) -> None:
    batcher = Batcher(consumer, 50)
    stale = FakeRequest(f.therapist_upserted(81))
    # A batch waits for a process the pool gives to another task; the connection drops,
    # and the pool discards the waiting batch (AsynPool.flush): its callbacks never come.
    batcher.in_flight = 1
    batcher.take(stale)  # type: ignore[arg-type]

    batcher.reset()  # DeadLetteringConsumer.on_close
    fresh = FakeRequest(f.therapist_upserted(82))
    batcher.take(fresh)  # type: ignore[arg-type]

    # The stale message comes back from the broker; the new one is not held behind it.
    assert stale.calls == []
    assert fresh.calls == ["accepted", "succeeded"]
    assert therapist(committed_db, 81) is None
    assert therapist(committed_db, 82) is not None
    assert batcher.buffer == []
    assert batcher.in_flight == 0


def test_a_batch_of_before_a_lost_connection_touches_nothing_after_it(
    consumer: FakeConsumer,
) -> None:
    batcher = Batcher(consumer, 50)
    old = [FakeRequest(f.therapist_upserted(91))]
    batcher.in_flight = 1
    finish = batcher._finisher([(old[0], None)], {})  # type: ignore[list-item]
    batcher.reset()
    batcher.in_flight = 1  # a batch of the new connection runs

    finish(None)  # the old batch's error callback, late

    assert batcher.in_flight == 1
    assert consumer.alone == []


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), "not a mapping"), (7, {}), ((), [["event", f.therapist_upserted(101)]])],
    ids=["kwargs-a-string", "args-a-number", "kwargs-pairs"],
)
def test_a_malformed_call_is_kept_as_a_dead_letter_and_the_rest_go_on(
    consumer: FakeConsumer, committed_db: Engine, args: Any, kwargs: Any
) -> None:
    batcher = busy(consumer)
    malformed = FakeRequest(f.therapist_upserted(101))
    malformed.args, malformed.kwargs = args, kwargs
    good = FakeRequest(f.therapist_upserted(102))

    batcher.take(malformed)  # type: ignore[arg-type]
    batcher.take(good)  # type: ignore[arg-type]
    batch_returned(batcher)

    assert consumer.kept == [(malformed.task_id, MALFORMED_CALL, {"args": args, "kwargs": kwargs})]
    assert consumer.alone == []
    assert therapist(committed_db, 101) is None
    assert good.calls == ["accepted", "succeeded"]
    assert therapist(committed_db, 102) is not None


def test_the_embedded_folder_broker_takes_no_batches(
    committed_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from comms_tasks.inbound.batcher import batcher_of
    from comms_tasks.settings import get_settings

    monkeypatch.delenv("COMMS_BROKER_URL", raising=False)
    get_settings.cache_clear()
    assert get_settings().broker_url is None
    assert not batcher_of(FakeConsumer()).enabled

    monkeypatch.setenv("COMMS_BROKER_URL", "redis://127.0.0.1:6379/0")
    get_settings.cache_clear()
    assert batcher_of(FakeConsumer()).enabled
    get_settings.cache_clear()
