"""Start-up says loudly when a setting works but is almost surely a mistake.

The file mail backend beside PostgreSQL marks every email ``sent`` into a folder that a
production deployment never reads (compose's container had no volume for it). Real
worker and beat processes are started; their output is read.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from comms_tasks.settings import Settings, startup_warnings
from tests.conftest import CeleryProcess, WorkerProcess, worker_environment

BEAT_START_TIMEOUT = 60


def test_file_backend_beside_postgresql_warns() -> None:
    settings = Settings(
        mail_backend="file", database_url="postgresql://comms@db.example.org:5432/comms"
    )

    [warning] = [w for w in startup_warnings(settings) if "COMMS_MAIL_BACKEND" in w]
    assert "PostgreSQL" in warning and "outbox" in warning


@pytest.mark.parametrize(
    "settings",
    [
        Settings(mail_backend="file"),  # the embedded default: SQLite under var/
        Settings(mail_backend="smtp", database_url="postgresql://comms@db:5432/comms"),
    ],
    ids=["file-with-sqlite", "smtp-with-postgresql"],
)
def test_no_warning_for_the_usual_shapes(settings: Settings) -> None:
    assert startup_warnings(settings) == []


def test_the_clear_text_opt_in_warns() -> None:
    settings = Settings(
        mail_backend="smtp",
        smtp_security="none",
        smtp_username="catcher",
        smtp_insecure_cleartext_auth=True,
    )

    assert any("COMMS_SMTP_INSECURE_CLEARTEXT_AUTH" in w for w in startup_warnings(settings))


def test_worker_with_file_backend_on_postgresql_warns_at_start(
    committed_url: str, worker_broker_url: str, tmp_path: Path
) -> None:
    env = worker_environment(
        COMMS_DATABASE_URL=committed_url,
        COMMS_BROKER_URL=worker_broker_url,
        COMMS_MAIL_BACKEND="file",
        COMMS_VAR_DIR=str(tmp_path / "var"),
    )
    name = f"filewarn-{uuid.uuid4().hex[:8]}@localhost"
    worker = WorkerProcess(env, tmp_path / "worker.log", "-n", name, "-Q", f"q-{name}")
    try:
        log = worker.log()
    finally:
        worker.stop()

    warnings = [line for line in log.splitlines() if "COMMS_MAIL_BACKEND" in line]
    assert warnings, log
    assert "WARNING" in warnings[0], warnings


def test_beat_with_file_backend_on_postgresql_warns_at_start(
    committed_url: str, tmp_path: Path
) -> None:
    env = worker_environment(
        COMMS_DATABASE_URL=committed_url,
        COMMS_MAIL_BACKEND="file",
        COMMS_VAR_DIR=str(tmp_path / "var"),
    )
    beat = CeleryProcess(env, tmp_path / "beat.log", "beat", "--loglevel=INFO")
    try:
        beat.wait_until_ready(lambda: "COMMS_MAIL_BACKEND" in beat.log(), BEAT_START_TIMEOUT)
    finally:
        beat.stop()

    [warning] = [line for line in beat.log().splitlines() if "COMMS_MAIL_BACKEND" in line]
    assert "WARNING" in warning, warning
