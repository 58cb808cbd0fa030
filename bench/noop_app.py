"""The inbound stage's baseline: a Celery app whose inbound tasks do nothing.

It registers the three names other services send upstream events to, with the worker
settings of the service (``celeryconfig``: acknowledgement after the task, prefetch,
serializers, task events, the broker's transport options), so that the same payloads on
the same broker, through a worker of the same shape, cost Celery's own work only: fetch,
decode, run nothing, acknowledge.

The bench starts it as ``celery -A bench.noop_app worker`` with one pool process. The
process counts its tasks and writes the time it finished the first and the
``BENCH_NOOP_EXPECTED``-th to ``BENCH_NOOP_TIMES`` (two lines, Unix seconds), which is
how the bench times the stage without touching each message.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import task_postrun

from comms_tasks.task_names import (
    HANDLE_MATCHING_EVENT,
    HANDLE_PATIENT_EVENT,
    HANDLE_THERAPIST_EVENT,
)

NAMES = (HANDLE_THERAPIST_EVENT, HANDLE_MATCHING_EVENT, HANDLE_PATIENT_EVENT)

app = Celery("bench-noop")
app.config_from_object("celeryconfig")
# Nothing scheduled here; the stray-message consumer stays (it is part of the settings).
app.conf.beat_schedule = {}


def _nothing(*_args: Any, **_kwargs: Any) -> None:
    return None


for _name in NAMES:
    app.task(name=_name)(_nothing)

_finished = 0


@task_postrun.connect
def _count(**_kwargs: Any) -> None:
    global _finished
    _finished += 1
    if _finished == 1 or _finished == int(os.environ["BENCH_NOOP_EXPECTED"]):
        with Path(os.environ["BENCH_NOOP_TIMES"]).open("a", encoding="ascii") as times:
            times.write(f"{time.time():.6f}\n")
