"""A burst of 10,000 inbound events: all applied, in bounded time and bounded memory.

1,000 therapists each get several ``therapist.upserted`` events with increasing
``occurred_at``, plus ``placement_request.created`` events; all are published as fast as
one producer can to a real worker (concurrency 2). Every event must end in
``processed_messages``; the RSS of the worker's main process and of each pool child is
sampled every second and must stay under 300 MB.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.models import DeadLetter, PlacementRequest, ProcessedMessage, Therapist
from comms_tasks.task_names import HANDLE_MATCHING_EVENT, HANDLE_THERAPIST_EVENT
from tests import factories as f
from tests.conftest import WorkerProcess, count_rows, worker_on_broker

pytestmark = pytest.mark.reliability

BROKER_SLOT = 5  # the broker_url fixture: this module's broker, on each kind
THERAPISTS = 1_000
UPDATES = 8
REQUESTS = 2_000
EVENTS = THERAPISTS * UPDATES + REQUESTS
APPLY_TIMEOUT = 300
MAX_RSS_MB = 300


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.update(int(child) for child in task.read_text().split())
        except OSError:
            continue
    return found


class RssSampler(threading.Thread):
    """Samples the RSS of a process and its children every second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak: dict[int, float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for pid in {self.pid, *children(self.pid)}:
                value = rss_mb(pid)
                if value is not None:
                    self.peak[pid] = max(self.peak.get(pid, 0.0), value)
            self._stop_event.wait(1.0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


@pytest.fixture
def load_worker(
    broker_url: str, committed_db: Engine, committed_url: str, worker_log_dir: Path
) -> Iterator[WorkerProcess]:
    with worker_on_broker(committed_url, broker_url, worker_log_dir, "load") as process:
        yield process


def burst() -> list[tuple[str, dict[str, Any]]]:
    messages: list[tuple[str, dict[str, Any]]] = []
    for update in range(UPDATES):
        for therapist_id in range(1, THERAPISTS + 1):
            event = f.therapist_upserted(
                therapist_id,
                occurred_at=f.at(update),
                last_name=f"Weber-{update}",
            )
            messages.append((HANDLE_THERAPIST_EVENT, event))
    for request_id in range(1, REQUESTS + 1):
        event = f.request_created(
            request_id,
            patient_id=10_000 + request_id,
            therapist_id=(request_id % THERAPISTS) + 1,
        )
        messages.append((HANDLE_MATCHING_EVENT, event))
    assert len(messages) == EVENTS
    return messages


def test_a_burst_of_ten_thousand_events_is_applied_in_bounded_time_and_memory(
    broker_url: str, load_worker: WorkerProcess, committed_db: Engine
) -> None:
    messages = burst()
    sampler = RssSampler(load_worker.process.pid)
    sampler.start()
    app = Celery("burst-service", broker=broker_url, set_as_current=False)
    app.conf.task_serializer = "json"
    started = time.monotonic()
    try:
        with app.producer_or_acquire() as producer:
            for task, event in messages:
                app.send_task(task, kwargs={"event": event}, producer=producer)
        published = time.monotonic() - started
        load_worker.wait_for(
            lambda: count_rows(committed_db, ProcessedMessage) >= EVENTS, timeout=APPLY_TIMEOUT
        )
        seconds = time.monotonic() - started
    finally:
        sampler.stop()
        app.close()

    assert load_worker.process.poll() is None, load_worker.tail()
    assert count_rows(committed_db, ProcessedMessage) == EVENTS
    assert count_rows(committed_db, DeadLetter) == 0
    assert count_rows(committed_db, Therapist) == THERAPISTS
    assert count_rows(committed_db, PlacementRequest) == REQUESTS
    with Session(committed_db) as session:
        names = set(session.scalars(select(Therapist.last_name)).all())
    # Out-of-order delivery (two pool processes) never lets an older update win.
    assert names == {f"Weber-{UPDATES - 1}"}
    assert sampler.peak, "no RSS sample taken"
    max_rss = max(sampler.peak.values())
    print(
        f"RELIABILITY load: events={EVENTS} seconds={seconds:.1f} "
        f"rate={EVENTS / seconds:.0f}/s max_rss_mb={max_rss:.0f} "
        f"publish_seconds={published:.1f} processes={len(sampler.peak)}"
    )
    assert max_rss < MAX_RSS_MB, sampler.peak
