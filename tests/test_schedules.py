"""The beat schedule: every entry names a real task, and local times survive DST."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest
from celery.schedules import crontab

from comms_tasks.app import app
from schedules import beat_schedule

# What a worker imports (celeryconfig ``imports``): every module with tasks.
app.loader.import_default_modules()

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def test_every_entry_names_a_registered_task() -> None:
    assert beat_schedule
    for name, entry in beat_schedule.items():
        assert entry["task"] in app.tasks, f"{name}: {entry['task']} is not a task"


def test_the_pipeline_is_scheduled() -> None:
    tasks = {entry["task"] for entry in beat_schedule.values()}
    assert {
        "comms.batch_requests",
        "comms.send_email",
        "comms.follow_up_check",
        "comms.relay_outbox",
        "comms.poll_mailbox",
    } <= tasks


def next_run(entry_name: str, after: dt.datetime) -> dt.datetime:
    """When the crontab entry fires next after ``after`` (an aware local time)."""
    schedule = beat_schedule[entry_name]["schedule"]
    assert isinstance(schedule, crontab)
    bound = crontab(
        minute=schedule._orig_minute,
        hour=schedule._orig_hour,
        day_of_week=schedule._orig_day_of_week,
        app=app,
        nowfun=lambda: after,
    )
    # The estimate is elapsed time: add it in UTC (aware local arithmetic is wall time).
    elapsed = bound.remaining_estimate(after)
    return (after.astimezone(dt.UTC) + elapsed).astimezone(BERLIN)


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        # Friday before the spring change (29 March 2026) -> Monday 07:30 summer time.
        (dt.datetime(2026, 3, 27, 8, 0, tzinfo=BERLIN), dt.datetime(2026, 3, 30, 7, 30)),
        # Friday before the autumn change (25 October 2026) -> Monday 07:30 winter time.
        (dt.datetime(2026, 10, 23, 8, 0, tzinfo=BERLIN), dt.datetime(2026, 10, 26, 7, 30)),
        # A Monday morning before the run.
        (dt.datetime(2026, 11, 30, 6, 0, tzinfo=BERLIN), dt.datetime(2026, 11, 30, 7, 30)),
    ],
)
def test_the_batch_runs_weekdays_at_0730_local(after: dt.datetime, expected: dt.datetime) -> None:
    fired = next_run("batch-requests", after)
    assert fired.replace(tzinfo=None) == expected
    assert fired.utcoffset() == expected.replace(tzinfo=BERLIN).utcoffset()


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        (dt.datetime(2026, 3, 28, 10, 0, tzinfo=BERLIN), dt.datetime(2026, 3, 29, 9, 0)),
        (dt.datetime(2026, 10, 24, 10, 0, tzinfo=BERLIN), dt.datetime(2026, 10, 25, 9, 0)),
    ],
)
def test_the_follow_up_check_runs_daily_at_0900_local(
    after: dt.datetime, expected: dt.datetime
) -> None:
    fired = next_run("follow-up-check", after)
    assert fired.replace(tzinfo=None) == expected
