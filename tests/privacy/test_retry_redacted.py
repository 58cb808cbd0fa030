"""``comms emails retry`` of an email whose body was redacted (erasure, retention).

A failed email is redacted like a sent one (erasure, and retention after the period), so
its stored body is the placeholder. A retry renders it again from the read model, as it
would be written now (without an erased patient, without withdrawn requests), before it
is queued; when no one is left to show, the retry is refused and the email stays failed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from comms_tasks.emails import rechecks
from comms_tasks.models import Email, EmailStatus
from tests import factories as f
from tests.conftest import worker_environment
from tests.privacy.test_retention import MARKER, PATIENT, apply, load, queued_email

COMMS = Path(sys.executable).parent / "comms"
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def comms(committed_db: Engine, committed_url: str, tmp_path: Path) -> Run:
    env = worker_environment(COMMS_DATABASE_URL=committed_url, COMMS_VAR_DIR=str(tmp_path))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(COMMS), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    return run


def failed_for_good(engine: Engine, email_id: int) -> None:
    with Session(engine) as session, session.begin():
        session.execute(
            update(Email)
            .where(Email.id == email_id)
            .values(
                status=EmailStatus.FAILED,
                retry_count=1,
                next_attempt_at=None,
                error_message="550 5.1.1 mailbox unavailable",
            )
        )


def test_a_retried_redacted_email_is_rendered_again_without_the_erased_patient(
    committed_db: Engine, comms: Run
) -> None:
    email_id = queued_email(1, [100, 200])
    failed_for_good(committed_db, email_id)
    apply(PATIENT, f.patient_erased(100, occurred_at=f.at(60)))
    assert load(committed_db, email_id).body_text == rechecks.REDACTED_TEXT

    result = comms("emails", "retry", str(email_id))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"email {email_id} retried: now queued"
    email = load(committed_db, email_id)
    assert email.status is EmailStatus.QUEUED
    assert email.body_redacted_at is None
    assert rechecks.REDACTED_TEXT not in email.body_text
    assert f"{MARKER}-200" in email.body_text
    assert f"{MARKER}-100" not in email.body_text + email.body_html
    assert email.subject == "Anfrage für einen Therapieplatz"
    assert {b.placement_request_id: b.included for b in email.batches} == {1001: False, 2001: True}


def test_a_retry_of_a_redacted_email_with_no_one_left_to_show_is_refused(
    committed_db: Engine, comms: Run
) -> None:
    email_id = queued_email(1, [100])
    failed_for_good(committed_db, email_id)
    apply(PATIENT, f.patient_erased(100, occurred_at=f.at(60)))

    result = comms("emails", "retry", str(email_id))

    assert result.returncode == 1, result.stdout
    assert result.stdout == ""
    assert result.stderr == (
        f"error: email {email_id} cannot be retried: its body was redacted and none of its"
        " requests may be shown again (withdrawn, or the patient was erased)\n"
    )
    email = load(committed_db, email_id)
    assert email.status is EmailStatus.FAILED
    assert email.body_text == rechecks.REDACTED_TEXT
    assert all(batch.included for batch in email.batches)
