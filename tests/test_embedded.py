"""The embedded default of `make run`: SQLite and the filesystem broker, a real worker."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from comms_tasks.db import make_engine
from comms_tasks.models import (
    Email,
    EmailStatus,
    OutboxEvent,
    PhoneCall,
    PlacementRequest,
    Therapist,
)
from tests import factories as f
from tests.conftest import PROJECT_ROOT, wait_for, worker_environment

COMMS = str(Path(sys.executable).parent / "comms")


def comms(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        [COMMS, *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_demo_flows_through_the_filesystem_broker_into_sqlite_and_out_as_eml_files(
    tmp_path: Path,
) -> None:
    env = worker_environment(COMMS_VAR_DIR=str(tmp_path / "var"), COMMS_LOG_LEVEL="WARNING")
    comms(env, "db", "upgrade")
    demo = json.loads(comms(env, "demo", "--json"))
    sent = demo["sent"]
    assert sent["therapist.upserted"] >= 25
    assert sent["placement_request.created"] >= 100

    output = comms(env, "run", "--batch-now", "--until-idle", "--for", "100", timeout=150)

    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'comms.db'}")
    with Session(engine) as session:
        therapists = session.scalar(select(func.count()).select_from(Therapist))
        requests = session.scalar(select(func.count()).select_from(PlacementRequest))
        # The demo's past (sent nine days ago) was never written as files.
        sent_emails = session.scalars(
            select(Email)
            .where(Email.status == EmailStatus.SENT)
            .where(Email.sent_at > dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        ).all()
        calls = session.scalars(select(PhoneCall)).all()
        # Beat's relay published events through the filesystem broker.
        relayed = session.scalar(
            select(func.count())
            .select_from(OutboxEvent)
            .where(OutboxEvent.published_at.is_not(None))
        )
    engine.dispose()
    assert therapists == sent["therapist.upserted"]
    assert requests == sent["placement_request.created"]
    files = sorted((tmp_path / "var" / "outbox").glob("*.eml"))
    assert sent_emails and len(files) == len(sent_emails)
    first = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert first["Message-ID"] in {row.message_id for row in sent_emails}
    therapists_emailed = len({row.therapist_id for row in sent_emails})
    flat = " ".join(output.split())
    assert f"Sent {len(sent_emails)} emails to {therapists_emailed} therapists in this run." in flat
    # The demo's unanswered past emails got follow-up calls, and the sheet is shown.
    assert relayed
    assert demo["past_emails"] > 0
    assert len(calls) == demo["past_emails"]
    assert "the first day's call sheet" in flat
    assert f"open {files[0]}" in flat
    assert (
        f"Loaded through messages: {therapists} therapists and {requests} placement requests"
        in " ".join(output.split())
    )


SEND = """
import json, sys
from comms_tasks.cli.shared import send_message
for task_name, kwargs in json.loads(sys.argv[1]):
    send_message(task_name, kwargs)
"""


def test_run_reports_once_then_one_line_per_change(tmp_path: Path) -> None:
    env = worker_environment(COMMS_VAR_DIR=str(tmp_path / "var"), COMMS_LOG_LEVEL="WARNING")
    comms(env, "db", "upgrade")
    log_path, errors_path = tmp_path / "run.out", tmp_path / "run.err"
    with log_path.open("w") as log, errors_path.open("w") as errors:
        run = subprocess.Popen(
            [COMMS, "run", "--for", "45"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=errors,
            text=True,
        )
    try:
        wait_for(lambda: "keep running" in log_path.read_text(), timeout=60)
        messages = [
            ("comms.handle_therapist_event", {"event": f.therapist_upserted(9101)}),
            # Malformed: a dead letter.
            ("comms.handle_patient_event", {"event": {"event_id": "not-an-event"}}),
        ]
        subprocess.run(
            [sys.executable, "-c", SEND, json.dumps(messages)],
            env=env,
            cwd=PROJECT_ROOT,
            check=True,
            timeout=60,
        )
        assert run.wait(timeout=90) == 0, errors_path.read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    output = log_path.read_text()
    lines = output.splitlines()

    # The whole report once, though beat keeps running tasks every few seconds.
    assert output.count("what happened") == 1, output
    assert output.count("Communication service") == 1, output
    after_report = lines[next(i for i, line in enumerate(lines) if "keep running" in line) :]
    changes = [line for line in after_report if "→" in line]
    assert any(line.endswith("therapists active: 0 → 1") for line in changes), output
    assert any(line.endswith("dead letters pending: 0 → 1") for line in changes), output
    # A line per change, nothing else.
    assert len(changes) == 2, output
