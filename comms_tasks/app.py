"""The Celery app, configured from ``celeryconfig`` (which reads the settings)."""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any

from celery import Celery
from celery.signals import beat_init, celeryd_after_setup, worker_init, worker_process_init

# Imported for what they register: the worker's conf command with every password masked
# (censored_conf), Flower's refusal to run without auth (flower_guard), and the time each
# scheduled task ran (task_runs).
import comms_tasks.worker.censored_conf
import comms_tasks.worker.flower_guard
import comms_tasks.worker.logs
import comms_tasks.worker.task_runs  # noqa: F401

# A chunk of the batch or of the call booking holds thousands of ORM objects; with the
# default threshold (700) the collector walks them over and over (a quarter of the time
# of booking 10,000 calls, see docs/performance.md). Cycles wait for 20,000 allocations.
GC_THRESHOLDS = (20_000, 20, 20)

# Inbound tasks' messages show their ids only, retries included (comms_tasks.privacy.task_reprs);
# every task counts its starts, so a message that kills its worker stops (deliveries).
app = Celery(
    "comms_tasks",
    amqp="comms_tasks.privacy.task_reprs:IdsOnlyAMQP",
    task_cls="comms_tasks.worker.deliveries:CountedTask",
)
app.config_from_object("celeryconfig")
# Each stage keeps its tasks in its own tasks.py (comms_tasks/<stage>/tasks.py).
STAGES = (
    "comms_tasks.projections",
    "comms_tasks.emails",
    "comms_tasks.calls",
    "comms_tasks.mailbox",
    "comms_tasks.events",
    "comms_tasks.privacy",
)
app.autodiscover_tasks(list(STAGES))


@worker_process_init.connect
def _fresh_connections_after_fork(**_kwargs: Any) -> None:
    # A forked pool process must not reuse the parent's database connections.
    from comms_tasks.db import reset_engine

    reset_engine()


@worker_process_init.connect
def _lighter_garbage_collection(**_kwargs: Any) -> None:
    # What the process has loaded by now (modules, templates) lives as long as it does:
    # the collector no longer looks at it.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@worker_init.connect
@beat_init.connect
def _stop_unless_the_database_answers(**_kwargs: Any) -> None:
    # A wrong COMMS_DATABASE_URL stops worker and beat at start with one line naming it,
    # rather than a traceback from every task (and a supervisor restarting it shows the
    # line each time). Raised past Celery's signal dispatch, which only catches Exception.
    from comms_tasks.db import check_database
    from comms_tasks.settings import ConfigurationError

    try:
        check_database()
    except ConfigurationError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None


# After logging is set up (worker_init comes before it), so the lines carry their level.
@celeryd_after_setup.connect
@beat_init.connect
def _warn_about_likely_mistakes(**_kwargs: Any) -> None:
    from comms_tasks.settings import get_settings, startup_warnings

    for warning in startup_warnings(get_settings()):
        logging.getLogger("comms_tasks.startup").warning("%s", warning)
