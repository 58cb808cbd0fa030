"""Every time ``comms`` prints is local time (``COMMS_TIMEZONE``) with its zone: tables
show ``2026-07-01 12:00 CEST``, ``--json`` ISO 8601 with the offset. Storage is UTC.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from comms_tasks.models import DeadLetter, EmailStatus, TaskRun
from tests.calls.test_calls import calls_of, follow_up_check, schedule_calls, sent_email
from tests.cli.test_cli import change_email, dead_letter, queue_email
from tests.conftest import worker_environment

COMMS = Path(sys.executable).parent / "comms"
WINTER = dt.datetime(2026, 1, 15, 8, 30, tzinfo=dt.UTC)
SUMMER = dt.datetime(2026, 7, 1, 10, 0, tzinfo=dt.UTC)
BERLIN = ZoneInfo("Europe/Berlin")


def comms(committed_url: str, tmp_path: Path, *args: str, zone: str | None = None) -> str:
    env = worker_environment(COMMS_DATABASE_URL=committed_url, COMMS_VAR_DIR=str(tmp_path))
    if zone is not None:
        env["COMMS_TIMEZONE"] = zone
    result = subprocess.run(
        [str(COMMS), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def as_json(committed_url: str, tmp_path: Path, *args: str, zone: str | None = None) -> Any:
    return json.loads(comms(committed_url, tmp_path, *args, "--json", zone=zone))


@pytest.fixture
def email_id(committed_db: Engine) -> int:
    """An email queued in winter and sent in summer."""
    email_id = queue_email(61, [610])
    change_email(
        committed_db,
        email_id,
        status=EmailStatus.SENT,
        queued_at=WINTER,
        sent_at=SUMMER,
        next_attempt_at=WINTER,
    )
    return email_id


def test_emails_list_and_show_print_local_time_with_its_zone(
    email_id: int, committed_url: str, tmp_path: Path
) -> None:
    table = comms(committed_url, tmp_path, "emails", "list")
    assert "2026-01-15 09:30 CET" in table and "2026-07-01 12:00 CEST" in table
    [item] = as_json(committed_url, tmp_path, "emails", "list")
    assert item["queued_at"] == "2026-01-15T09:30:00+01:00"
    assert item["sent_at"] == "2026-07-01T12:00:00+02:00"

    shown = comms(committed_url, tmp_path, "emails", "show", str(email_id))
    assert "queued_at: 2026-01-15 09:30:00 CET" in shown
    assert "sent_at: 2026-07-01 12:00:00 CEST" in shown
    assert as_json(committed_url, tmp_path, "emails", "show", str(email_id))["sent_at"] == (
        "2026-07-01T12:00:00+02:00"
    )


def test_the_zone_is_the_configured_one(email_id: int, committed_url: str, tmp_path: Path) -> None:
    zone = "America/New_York"
    assert "2026-07-01 06:00 EDT" in comms(committed_url, tmp_path, "emails", "list", zone=zone)
    [item] = as_json(committed_url, tmp_path, "emails", "list", zone=zone)
    assert item["sent_at"] == "2026-07-01T06:00:00-04:00"


def test_dead_letters_print_local_time_with_its_zone(
    committed_db: Engine, committed_url: str, tmp_path: Path
) -> None:
    letter_id = dead_letter({"event_id": "not-an-event"})
    with committed_db.begin() as connection:
        connection.execute(
            update(DeadLetter).where(DeadLetter.id == letter_id).values(received_at=SUMMER)
        )

    assert "2026-07-01 12:00 CEST" in comms(committed_url, tmp_path, "dead-letters", "list")
    [item] = as_json(committed_url, tmp_path, "dead-letters", "list")
    assert item["received_at"] == "2026-07-01T12:00:00+02:00"
    shown = comms(committed_url, tmp_path, "dead-letters", "show", str(letter_id))
    assert "received_at: 2026-07-01 12:00:00 CEST" in shown


def test_status_prints_the_last_runs_in_local_time_with_its_zone(
    committed_db: Engine, committed_url: str, tmp_path: Path
) -> None:
    with Session(committed_db) as session, session.begin():
        session.add(
            TaskRun(task_name="comms.batch_requests", last_finished_at=WINTER, last_state="SUCCESS")
        )

    assert "2026-01-15 09:30 CET" in comms(committed_url, tmp_path, "status")
    runs = as_json(committed_url, tmp_path, "status")["last_runs"]
    assert runs["comms.batch_requests"]["last_finished_at"] == "2026-01-15T09:30:00+01:00"


def test_the_call_sheet_prints_local_time_with_its_zone(
    committed_db: Engine, committed_url: str, tmp_path: Path
) -> None:
    sent_email(62)
    follow_up_check()
    schedule_calls()
    [call] = calls_of(committed_db)
    day = call.scheduled_date.isoformat()
    berlin = call.scheduled_at.astimezone(BERLIN)

    sheet = as_json(committed_url, tmp_path, "calls", "today", "--date", day)
    [entry] = sheet["calls"]
    assert entry["scheduled_at"] == berlin.isoformat()
    assert entry["time"] == f"{berlin:%H:%M}"
    table = comms(committed_url, tmp_path, "calls", "today", "--date", day)
    assert f"{berlin:%H:%M} {berlin:%Z}" in table
