"""``comms`` pointed at a database that is not there, or not migrated.

Only ``comms db upgrade`` creates a database. Every other command, read-only or not,
leaves the folder as it found it and says in one line where it looked and what to do,
with the URL's password masked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from comms_tasks import migrate
from tests.conftest import database_url, worker_environment

COMMS = Path(sys.executable).parent / "comms"
PASSWORD = "pw-never-printed-77aa"

# Every command that uses the database, with the arguments it needs; `db upgrade` aside.
COMMANDS = [
    "status",
    "emails list",
    "emails show 1",
    "emails retry 1",
    "emails cancel 1",
    "dead-letters list",
    "dead-letters show 1",
    "dead-letters replay --all",
    "calls today",
    "calls ics -o calls.ics",
    "calls outcome 1 --status cancelled",
    "explain therapist 1",
    "preview therapist 1",
    "purge-expired",
    "demo",
    "run --for 5",
    "db downgrade base",
]


def comms(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = worker_environment(**env)
    for name in ("COLUMNS", "LINES"):
        environment.pop(name, None)
    return subprocess.run(
        [str(COMMS), *args], env=environment, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *parts: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ")
    for part in parts:
        assert part in line, line
    return line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_run_in_another_folder_creates_no_database_and_says_where_it_looked(
    tmp_path: Path, command: str
) -> None:
    # The embedded default, relative to the folder the operator happens to be in.
    result = comms(tmp_path, *command.split())

    expected = tmp_path / "var" / "comms.db"
    assert_one_line(result, f"no database at {expected}", "comms db upgrade")
    assert not (tmp_path / "var").exists()
    assert list(tmp_path.iterdir()) == []


def test_db_upgrade_still_creates_the_embedded_database(tmp_path: Path) -> None:
    result = comms(tmp_path, "db", "upgrade")

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "var" / "comms.db").exists()
    assert comms(tmp_path, "status", "--json").returncode == 0


@pytest.fixture
def unmigrated_url() -> str:
    """An empty PostgreSQL database, reached with a password in its URL."""
    name = f"comms_test_unmigrated_{os.getpid()}"
    migrate.recreate_database(database_url(name))
    return make_url(database_url(name)).set(password=PASSWORD).render_as_string(False)


@pytest.mark.parametrize("command", ["status", "emails list", "calls today", "demo"])
def test_an_unmigrated_database_says_to_run_db_upgrade_naming_it_without_the_password(
    tmp_path: Path, unmigrated_url: str, command: str
) -> None:
    result = comms(tmp_path, *command.split(), COMMS_DATABASE_URL=unmigrated_url)

    line = assert_one_line(result, "not migrated", "run `comms db upgrade`")
    assert PASSWORD not in result.stderr
    assert make_url(unmigrated_url).render_as_string(hide_password=True) in line


def test_a_database_behind_the_code_says_to_run_db_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    script = ScriptDirectory.from_config(migrate.alembic_config(url))
    head = script.get_current_head()
    assert head is not None
    previous = script.get_revision(head).down_revision
    assert isinstance(previous, str)
    migrate.upgrade(url, previous)

    result = comms(tmp_path, "status", COMMS_DATABASE_URL=url)

    assert_one_line(result, f"at revision {previous}", head, "run `comms db upgrade`")
