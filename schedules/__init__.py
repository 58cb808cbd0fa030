"""Beat schedules: what runs when. Times of day are local (``COMMS_TIMEZONE``).

Celery evaluates crontabs in the app's time zone, so "07:30" is 07:30 in Berlin in
winter and in summer.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

# Seconds between outbox relays: events reach other services within this delay.
OUTBOX_RELAY_INTERVAL_SECONDS = 5.0
# Seconds between sends of due emails (new ones and retries whose wait is over).
SEND_INTERVAL_SECONDS = 60.0
BATCH_TIME = {"hour": 7, "minute": 30}
BATCH_DAYS = "mon-fri"
FOLLOW_UP_TIME = {"hour": 9, "minute": 0}
# Seconds between polls of the mailbox (replies, automatic answers, bounces).
MAILBOX_POLL_INTERVAL_SECONDS = 120.0
# Email bodies past the retention period are redacted once a night.
RETENTION_TIME = {"hour": 3, "minute": 15}
# A message header every beat entry sets: only runs that beat started move the task's
# clock in ``task_runs`` (the same task started after a command or by a chain does not).
BEAT_HEADER = "comms_beat"

beat_schedule: dict[str, dict[str, Any]] = {
    "batch-requests": {
        "task": "comms.batch_requests",
        "schedule": crontab(**BATCH_TIME, day_of_week=BATCH_DAYS),
    },
    "follow-up-check": {
        # Ends by starting comms.schedule_calls, which books the calls.
        "task": "comms.follow_up_check",
        "schedule": crontab(**FOLLOW_UP_TIME),
    },
    "send-email": {
        "task": "comms.send_email",
        "schedule": SEND_INTERVAL_SECONDS,
        # A run that could not start in time is superseded by the next one.
        "options": {"expires": SEND_INTERVAL_SECONDS},
    },
    "purge-expired": {
        "task": "comms.purge_expired",
        "schedule": crontab(**RETENTION_TIME),
    },
    "poll-mailbox": {
        "task": "comms.poll_mailbox",
        "schedule": MAILBOX_POLL_INTERVAL_SECONDS,
        # A poll that could not start in time is superseded by the next one.
        "options": {"expires": MAILBOX_POLL_INTERVAL_SECONDS},
    },
    "relay-outbox": {
        "task": "comms.relay_outbox",
        "schedule": OUTBOX_RELAY_INTERVAL_SECONDS,
        "options": {"expires": OUTBOX_RELAY_INTERVAL_SECONDS * 2},
    },
}

for _entry in beat_schedule.values():
    _entry.setdefault("options", {})["headers"] = {BEAT_HEADER: True}
