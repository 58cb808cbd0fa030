"""``comms`` ends with one line, never a traceback: an unreachable broker, a file it
cannot write, a revision that does not exist.

A broker that refuses the connection, or one that accepts it and never answers, is
said within seconds, naming the broker URL with its password masked.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.calls.test_calls import calls_of, follow_up_check, schedule_calls, sent_email
from tests.conftest import free_port, worker_environment

COMMS = Path(sys.executable).parent / "comms"
PASSWORD = "pw-never-printed-b40c"
# The broker's own retries and timeouts bounded: well below "minutes".
FAST_ENOUGH_SECONDS = 30


def comms(
    tmp_path: Path, *args: str, timeout: float = 120, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    environment = worker_environment(COMMS_VAR_DIR=str(tmp_path / "var"), **env)
    for name in ("COLUMNS", "LINES"):
        environment.pop(name, None)
    started = time.monotonic()
    result = subprocess.run(
        [str(COMMS), *args],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result, time.monotonic() - started


def one_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.stdout, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose server accepts connections and never says a word."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def broker_urls(silent: int) -> dict[str, str]:
    refused = free_port()
    return {
        "redis refused": f"redis://:{PASSWORD}@127.0.0.1:{refused}/0",
        "redis silent": f"redis://:{PASSWORD}@127.0.0.1:{silent}/0",
        "amqp refused": f"amqp://guest:{PASSWORD}@127.0.0.1:{refused}//",
        "amqp silent": f"amqp://guest:{PASSWORD}@127.0.0.1:{silent}//",
    }


def assert_names_the_broker(line: str, url: str) -> None:
    assert PASSWORD not in line
    masked = url.replace(PASSWORD, "***")
    assert f"COMMS_BROKER_URL: cannot reach {masked}" in line, line


@pytest.mark.parametrize("kind", ["redis refused", "redis silent", "amqp refused", "amqp silent"])
def test_calls_outcome_to_an_unreachable_broker_fails_fast_in_one_line(
    committed_db: Engine, committed_url: str, tmp_path: Path, silent_port: int, kind: str
) -> None:
    sent_email(41)
    follow_up_check()
    schedule_calls()
    [call] = calls_of(committed_db)
    url = broker_urls(silent_port)[kind]

    result, took = comms(
        tmp_path,
        *("calls", "outcome", str(call.id), "--status", "cancelled"),
        COMMS_DATABASE_URL=committed_url,
        COMMS_BROKER_URL=url,
    )

    assert_names_the_broker(one_line(result), url)
    assert took < FAST_ENOUGH_SECONDS


@pytest.mark.parametrize("kind", ["redis refused", "redis silent"])
@pytest.mark.parametrize("command", ["demo", "run --for 60"])
def test_demo_and_run_with_an_unreachable_broker_fail_fast_in_one_line(
    tmp_path: Path, silent_port: int, kind: str, command: str
) -> None:
    database = f"sqlite:///{tmp_path / 'comms.db'}"
    upgraded, _ = comms(tmp_path, "db", "upgrade", COMMS_DATABASE_URL=database)
    assert upgraded.returncode == 0, upgraded.stderr
    url = broker_urls(silent_port)[kind]

    result, took = comms(
        tmp_path, *command.split(), COMMS_DATABASE_URL=database, COMMS_BROKER_URL=url
    )

    assert_names_the_broker(one_line(result), url)
    assert took < FAST_ENOUGH_SECONDS


def test_calls_ics_into_a_missing_folder_is_one_line(committed_url: str, tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "x.ics"
    result, _ = comms(tmp_path, "calls", "ics", "-o", str(target), COMMS_DATABASE_URL=committed_url)

    line = one_line(result)
    assert str(target) in line and "No such file or directory" in line
    assert result.stdout == ""


def test_db_upgrade_to_an_unknown_revision_is_one_line(tmp_path: Path) -> None:
    result, _ = comms(
        tmp_path, "db", "upgrade", "nosuchrev", COMMS_DATABASE_URL=f"sqlite:///{tmp_path}/x.db"
    )

    assert one_line(result) == "error: db upgrade: Can't locate revision identified by 'nosuchrev'"
