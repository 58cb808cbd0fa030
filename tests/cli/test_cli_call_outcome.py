"""``comms calls outcome`` checks what the database already knows before it sends anything.

An unknown call, a request that is not on the call, a call already recorded, request
outcomes with ``--status failed`` or ``cancelled``, a ``--retry-after`` without
``failed`` or in the past: one line, a non-zero exit, and no message on the broker
(which would only become a dead letter).

The command publishes to the embedded filesystem broker of the test's own folder, where
no worker takes messages away: its files are the messages sent.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, update

from comms_tasks.models import PhoneCall, PhoneCallStatus
from tests.calls.test_calls import calls_of, follow_up_check, schedule_calls, sent_email
from tests.conftest import worker_environment

COMMS = Path(sys.executable).parent / "comms"
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture
def call_id(committed_db: Engine) -> int:
    """A scheduled call about requests 510 and 511."""
    sent_email(51)
    follow_up_check()
    schedule_calls()
    [call] = calls_of(committed_db)
    assert {batch.placement_request_id for batch in call.batches} == {510, 511}
    return call.id


class Broker:
    """The messages waiting in the filesystem broker under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "broker" / "queue"

    def sent(self) -> int:
        return len(list(self.folder.glob("*.msg"))) if self.folder.exists() else 0


@pytest.fixture
def broker(tmp_path: Path) -> Broker:
    return Broker(tmp_path)


def outcome(committed_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = worker_environment(COMMS_DATABASE_URL=committed_url, COMMS_VAR_DIR=str(tmp_path))
    return subprocess.run(
        [str(COMMS), "calls", "outcome", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def refused(result: subprocess.CompletedProcess[str], message: str, code: int) -> None:
    assert (result.returncode, result.stdout, result.stderr) == (code, "", f"error: {message}\n")


def today() -> dt.date:
    return dt.datetime.now(BERLIN).date()


def test_an_unknown_call_is_refused_and_nothing_is_sent(
    committed_db: Engine, committed_url: str, broker: Broker, tmp_path: Path
) -> None:
    result = outcome(committed_url, tmp_path, "99999", "--status", "completed")

    refused(result, "call 99999 does not exist", 1)
    assert broker.sent() == 0


def test_a_request_that_is_not_on_the_call_is_refused(
    call_id: int, committed_url: str, broker: Broker, tmp_path: Path
) -> None:
    result = outcome(
        committed_url,
        tmp_path,
        str(call_id),
        *("--status", "completed", "--request", "510=accepted", "--request", "999=rejected"),
    )

    refused(
        result, f"--request: request 999 is not part of call {call_id} (its requests: 510, 511)", 1
    )
    assert broker.sent() == 0


def test_a_call_already_recorded_is_refused(
    call_id: int,
    committed_db: Engine,
    committed_url: str,
    broker: Broker,
    tmp_path: Path,
) -> None:
    with committed_db.begin() as connection:
        connection.execute(
            update(PhoneCall)
            .where(PhoneCall.id == call_id)
            .values(status=PhoneCallStatus.COMPLETED)
        )

    result = outcome(committed_url, tmp_path, str(call_id), "--status", "cancelled")

    refused(result, f"call {call_id} is already completed: its outcome was recorded", 1)
    assert broker.sent() == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--status", "failed", "--request", "510=accepted"],
            "--request: only with --status completed (a failed call discussed nothing)",
        ),
        (
            ["--status", "cancelled", "--request", "510=discussed"],
            "--request: only with --status completed (a cancelled call discussed nothing)",
        ),
        (
            ["--status", "completed", "--retry-after", "2099-01-01"],
            "--retry-after: only with --status failed",
        ),
    ],
)
def test_options_that_do_not_fit_the_status_are_refused(
    call_id: int,
    committed_url: str,
    broker: Broker,
    tmp_path: Path,
    arguments: list[str],
    message: str,
) -> None:
    result = outcome(committed_url, tmp_path, str(call_id), *arguments)

    refused(result, message, 2)
    assert broker.sent() == 0


def test_a_retry_after_in_the_past_is_refused(
    call_id: int, committed_url: str, broker: Broker, tmp_path: Path
) -> None:
    day = (today() - dt.timedelta(days=1)).isoformat()
    result = outcome(
        committed_url, tmp_path, str(call_id), "--status", "failed", "--retry-after", day
    )

    refused(result, f"--retry-after: {day} lies in the past (today is {today().isoformat()})", 2)
    assert broker.sent() == 0


def test_a_fitting_outcome_is_sent(
    call_id: int, committed_url: str, broker: Broker, tmp_path: Path
) -> None:
    result = outcome(
        committed_url,
        tmp_path,
        str(call_id),
        *("--status", "failed", "--retry-after", today().isoformat()),
    )

    assert result.returncode == 0, result.stderr
    assert f"sent the outcome of call {call_id}" in result.stdout
    assert broker.sent() == 1
