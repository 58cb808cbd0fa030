"""``COMMS_DATABASE_URL`` as operators write it, and as they get it wrong.

The form every PostgreSQL tool prints (``postgresql://user@host/db``) works with the
driver that is installed. A URL that cannot work (bad syntax, unknown scheme, a host
that does not answer, a database that does not exist) stops ``comms``, the worker and
beat with one line naming the variable: no traceback, never the password.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from comms_tasks.db import make_engine
from comms_tasks.models import Therapist
from comms_tasks.settings import ConfigurationError, load_settings
from tests import factories as f
from tests.conftest import PROJECT_ROOT, free_port, other_service, wait_for, worker_environment

BIN = Path(sys.executable).parent
PASSWORD = "pw-never-printed-5e1f"
VARIABLE = "COMMS_DATABASE_URL"


def bad_urls() -> dict[str, str]:
    return {
        "bad syntax": f"postgresql://postgres:{PASSWORD}@127.0.0.1:port/db",
        "not a url": "::comms::",
        "unknown scheme": f"mysql://postgres:{PASSWORD}@127.0.0.1/comms",
        "uninstalled driver": f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1/comms",
        "unreachable host": f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/comms",
        "unknown host": f"postgresql://postgres:{PASSWORD}@no-such-host.invalid/comms",
        "missing database": f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/comms_no_such_db",
    }


BAD_URLS = bad_urls()


def plain_form(url: str) -> str:
    """``url`` as PostgreSQL tools print it: no driver in the scheme."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def environment(tmp_path: Path, database_url: str) -> dict[str, str]:
    env = worker_environment(COMMS_DATABASE_URL=database_url, COMMS_VAR_DIR=str(tmp_path / "var"))
    # COLUMNS would change where a console wraps a line.
    for name in ("COLUMNS", "LINES"):
        env.pop(name, None)
    return env


def run(
    env: dict[str, str], *command: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_naming_the_variable(
    result: subprocess.CompletedProcess[str], *, only_line: bool = True
) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output
    assert PASSWORD not in output
    lines = result.stderr.splitlines()
    if only_line:
        assert len(lines) == 1, lines
    # Celery may say a word before (its banner, a warning about running as root): the
    # reason is the last line, and the only one about the database.
    assert lines and VARIABLE in lines[-1], lines
    assert [line for line in output.splitlines() if VARIABLE in line] == lines[-1:]


# --- the form tools print ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_url_without_a_driver_uses_the_installed_one(
    monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    url = f"{scheme}://postgres@127.0.0.1:5432/comms"
    monkeypatch.setenv(VARIABLE, url)

    assert load_settings().effective_database_url.startswith("postgresql+psycopg2://")
    engine = make_engine(url)
    assert engine.dialect.driver == "psycopg2"
    engine.dispose()


@pytest.mark.parametrize(
    "kind", ["bad syntax", "not a url", "unknown scheme", "uninstalled driver"]
)
def test_a_url_that_cannot_work_is_a_configuration_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setenv(VARIABLE, BAD_URLS[kind])

    with pytest.raises(ConfigurationError, match=VARIABLE) as caught:
        load_settings()

    assert PASSWORD not in str(caught.value)
    assert "\n" not in str(caught.value)
    # Our reason, not pydantic's wording around it.
    assert f"{VARIABLE}: Value error" not in str(caught.value)


def test_comms_and_the_worker_work_with_the_url_tools_print(
    committed_db: Engine, committed_url: str, worker_broker_url: str, tmp_path: Path
) -> None:
    url = plain_form(committed_url)
    assert url.startswith("postgresql://")
    env = environment(tmp_path, url)

    status = run(env, "comms", "status", "--json")
    assert status.returncode == 0, status.stderr

    env["COMMS_BROKER_URL"] = worker_broker_url
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [
                str(BIN / "celery"),
                *("-A", "comms_tasks", "worker", "--concurrency=1", "--queues=plain-url-test"),
                # A node name of its own: the session's worker shares this broker (RabbitMQ
                # refuses a second node of one name: its control queue is exclusive).
                "--hostname=plain-url@%h",
                *("--without-mingle", "--without-gossip"),
            ],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        sender = other_service(worker_broker_url)
        sender.send_task(
            "comms.handle_therapist_event",
            kwargs={"event": f.therapist_upserted(7101)},
            queue="plain-url-test",
        )

        def stored() -> bool:
            assert worker.poll() is None, log_path.read_text()
            with Session(committed_db) as session:
                return session.scalar(select(Therapist.id).where(Therapist.id == 7101)) is not None

        wait_for(stored, timeout=60, explain=log_path.read_text)
        sender.close()
    finally:
        worker.terminate()
        worker.wait(timeout=30)


# --- a bad URL: one line, for every process ---------------------------------------------


@pytest.mark.parametrize("kind", sorted(BAD_URLS))
def test_comms_status_with_a_bad_url_prints_one_line_naming_the_variable(
    tmp_path: Path, kind: str
) -> None:
    result = run(environment(tmp_path, BAD_URLS[kind]), "comms", "status")

    assert_one_line_naming_the_variable(result)
    assert result.stdout == ""


@pytest.mark.parametrize("kind", sorted(BAD_URLS))
@pytest.mark.parametrize("process", ["worker", "beat"])
def test_worker_and_beat_with_a_bad_url_stop_at_start_with_one_line(
    tmp_path: Path, kind: str, process: str
) -> None:
    arguments = ["--concurrency=1", "--without-mingle", "--without-gossip"]
    result = run(
        environment(tmp_path, BAD_URLS[kind]),
        "celery",
        "-A",
        "comms_tasks",
        process,
        "--loglevel=INFO",
        *(arguments if process == "worker" else []),
        timeout=60,
    )

    assert_one_line_naming_the_variable(result, only_line=False)


@pytest.mark.parametrize(
    "command",
    [
        "emails list",
        "dead-letters list",
        "dead-letters replay --all",
        "purge-expired",
        "calls today",
        "explain therapist 1",
        "db upgrade",
        "run --for 5",
    ],
)
def test_every_command_that_reads_the_database_says_the_same_line(
    tmp_path: Path, command: str
) -> None:
    result = run(environment(tmp_path, BAD_URLS["missing database"]), "comms", *command.split())

    assert_one_line_naming_the_variable(result)
    assert "comms_no_such_db" in result.stderr
