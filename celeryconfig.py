"""Celery configuration, built from the typed settings (``COMMS_*`` variables).

Each option says why it is set. Loaded lazily by ``comms_tasks.app`` on first use.
"""

from __future__ import annotations

import sys
from pathlib import Path

from comms_tasks.settings import ConfigurationError, get_settings
from schedules import beat_schedule as _beat_schedule

try:
    _settings = get_settings()
except ConfigurationError as exc:
    # Stop start-up with the variable named, not a traceback through Celery's loader.
    sys.exit(str(exc))

_embedded_broker = _settings.broker_url is None

broker_url = _settings.effective_broker_url
if _embedded_broker:
    # The embedded default: one folder is both inbox and outbox, so every process on
    # this machine (worker, beat, `comms`) sees the same queues without a server.
    _folder = str(_settings.broker_folder / "queue")
    _control = str(_settings.broker_folder / "control")
    for _path in (_folder, _control):
        Path(_path).mkdir(parents=True, exist_ok=True)
    broker_transport_options: dict[str, object] = {
        "data_folder_in": _folder,
        "data_folder_out": _folder,
        "control_folder": _control,
        "store_processed": False,
        # The folder is polled: after each poll that found nothing to take (one message
        # per process, see the prefetch below) the consumer sleeps this long.
        "polling_interval": 0.1,
    }
else:
    broker_transport_options = {
        # A publish to an unreachable broker gives up after a few tries instead of
        # hanging the caller (a task, beat, or `comms`).
        "max_retries": 3,
        "interval_start": 0,
        "interval_step": 0.5,
        "interval_max": 2,
    }
    if not _settings.rabbitmq:
        # Redis: a task not acknowledged within this time is delivered again. Longer than
        # the hard time limit, so a running task is never handed to a second worker.
        broker_transport_options["visibility_timeout"] = _settings.task_time_limit * 4

# RabbitMQ (docs/operations.md, "Choosing a broker"). The task queue is a quorum queue:
# durable, replicated over a cluster's nodes, a message kept until it is acknowledged.
# Celery sees it and takes no global QoS (quorum queues refuse it, a prefetch count per
# consumer instead) and delays a countdown (an inbound retry) in RabbitMQ's own delayed
# delivery queues, which need the task exchange to be a topic exchange. Publishing a task
# waits for the broker's confirm: a `send_task` or a retry that returned is on the queue.
if _settings.rabbitmq:
    broker_transport_options["confirm_publish"] = True
    task_default_queue_type = _settings.rabbitmq_queue_type
    if task_default_queue_type == "quorum":
        # Not the queue's own name: a service that sends us tasks with Celery's defaults
        # declares an exchange `celery` of type direct, which must not clash with this one.
        task_default_exchange = "comms.tasks"
        task_default_exchange_type = "topic"
        task_default_routing_key = "celery"
        worker_detect_quorum_queues = True

# Results are not used to pass data between tasks (the database holds the state), so
# by default none are stored; a backend can be configured for operators who want them.
result_backend = _settings.result_backend
task_ignore_result = _settings.result_backend is None
# A backend never stores a task's arguments (inbound ones hold patient data), whatever a
# later Celery defaults to.
result_extended = False

# JSON only: pickle would let anyone who can publish to the broker run code here.
accept_content = ["json"]
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
result_accept_content = ["json"]

# Acknowledge after the task ran, and give the message back if the worker process dies
# (SIGKILL, OOM): a task is never lost with a crashed worker. Tasks are idempotent.
task_acks_late = True
task_reject_on_worker_lost = True
# Short tasks: take one message at a time per process so a slow one does not hold back
# messages another process could run. While inbound messages wait for a batch
# (comms_tasks.inbound.batcher) the consumer raises its own prefetch, one per waiting
# message, as Celery does for a countdown. A quorum queue's consumer cannot change its
# prefetch once it consumes (per-consumer QoS applies to new consumers only): there it
# is the batch size from the start, for every task, so that a batch can fill; a busy
# worker may then hold that many messages per process (docs/decisions.md).
worker_prefetch_multiplier = 1
if _settings.rabbitmq and _settings.rabbitmq_queue_type == "quorum":
    worker_prefetch_multiplier = _settings.inbound_batch

# A message the worker cannot run (an unknown task name, a body it cannot decode) is a
# dead letter, never a log line with its body (comms_tasks.inbound.stray_messages).
worker_consumer = "comms_tasks.inbound.stray_messages:DeadLetteringConsumer"

# Task events, so Flower shows every task with its state and runtime.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

# Keep retrying the broker connection at start-up (Celery 6 stops doing so by default):
# a worker started before Redis is up waits for it instead of exiting.
broker_connection_retry_on_startup = True
broker_connection_max_retries = None

# Publishing a task retries a bounded number of times, then raises, so a caller is never
# stuck on a broker that is down.
task_publish_retry = True
task_publish_retry_policy = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 2,
}

# A task that runs away is interrupted (soft: SoftTimeLimitExceeded, to clean up), then
# killed (hard). The email claim lease is longer than the hard limit.
task_soft_time_limit = _settings.task_soft_time_limit
task_time_limit = _settings.task_time_limit

# We configure logging ourselves (comms_tasks.logging): Celery must not replace the
# root logger's handlers.
worker_hijack_root_logger = False

# Business rules run in the business time zone; timestamps are UTC.
timezone = _settings.timezone
enable_utc = True

# Inbound messages arrive on Celery's default queue, which is what other services'
# `send_task` targets unless told otherwise (CONTRACTS.md). Internal tasks share it.
task_default_queue = "celery"

beat_schedule = _beat_schedule
if _settings.redbeat_redis_url:
    # Production: RedBeat keeps the schedule in Redis and holds a lock, so only one beat
    # is active however many are started.
    # RedBeat, touching a heartbeat file at each tick (comms_tasks.worker.beat_redbeat).
    beat_scheduler = "comms_tasks.worker.beat_redbeat:HeartbeatRedBeatScheduler"
    redbeat_redis_url = _settings.redbeat_redis_url
    redbeat_lock_timeout = 60
    beat_max_loop_interval = 5
else:
    # The embedded default: the file scheduler keeps its state under var/ (with the same
    # heartbeat as RedBeat's).
    beat_scheduler = "comms_tasks.worker.beat_health:HeartbeatPersistentScheduler"
    beat_schedule_filename = str(_settings.var_dir / "celerybeat-schedule")
