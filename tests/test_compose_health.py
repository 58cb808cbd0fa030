"""Compose's healthchecks run real commands of this project, and a restart is warm.

Docker does not run here, so each healthcheck command is taken from docker-compose.yml
and run as Docker would run it inside the container, against a real worker and a real
beat started for the test: it must succeed while the process works and fail without it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from comms_tasks.settings import Settings
from tests.conftest import PROJECT_ROOT, CeleryProcess, WorkerProcess, worker_environment
from tests.test_compose import COMPOSE_FILE, read_compose

CHECK_TIMEOUT = 60


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return read_compose(COMPOSE_FILE.read_text(encoding="utf-8"))


def healthcheck(compose: dict[str, Any], name: str) -> dict[str, Any]:
    check = compose["services"][name].get("healthcheck")
    assert isinstance(check, dict), f"{name} has no healthcheck"
    return check


def run_healthcheck(check: dict[str, Any], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``test`` as Docker does: CMD as words, CMD-SHELL through /bin/sh; ``$$`` is
    compose's escape for ``$``; ``python`` and ``celery`` are this environment's."""
    kind, *words = check["test"]
    words = [word.replace("$$", "$") for word in words]
    bin_dir = str(Path(sys.executable).parent)
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    if kind == "CMD-SHELL":
        [command] = words
        arguments = ["/bin/sh", "-c", command]
    else:
        assert kind == "CMD", check
        arguments = words
    return subprocess.run(
        arguments,
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT,
        check=False,
    )


# The broker_url fixture: the worker's check on each broker (compose has a RabbitMQ shape).
BROKER_SLOT = 1


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match[1]) * (60 if match[2] == "m" else 1)


def test_worker_stop_grace_period_outlasts_the_longest_task(compose: dict[str, Any]) -> None:
    grace = seconds(compose["services"]["worker"]["stop_grace_period"])
    environment = compose["services"]["worker"]["environment"]
    hard_limit = int(environment.get("COMMS_TASK_TIME_LIMIT", Settings().task_time_limit))
    assert grace > hard_limit


def test_worker_healthcheck_answers_for_its_own_node_only(
    compose: dict[str, Any], committed_url: str, broker_url: str, tmp_path: Path
) -> None:
    check = healthcheck(compose, "worker")
    host = f"health-{uuid.uuid4().hex[:8]}"
    env = worker_environment(
        COMMS_DATABASE_URL=committed_url,
        COMMS_BROKER_URL=broker_url,
        COMMS_VAR_DIR=str(tmp_path / "var"),
    )
    # Without the worker: no reply, a failing check.
    absent = run_healthcheck(check, {**env, "HOSTNAME": host})
    assert absent.returncode != 0, absent.stdout

    worker = WorkerProcess(env, tmp_path / "worker.log", "-n", f"celery@{host}", "-Q", host)
    try:
        present = run_healthcheck(check, {**env, "HOSTNAME": host})
        other = run_healthcheck(check, {**env, "HOSTNAME": host + "-other"})
    finally:
        worker.stop()

    assert present.returncode == 0, present.stdout + present.stderr
    assert other.returncode != 0, other.stdout


def test_beat_healthcheck_follows_the_beat(compose: dict[str, Any], tmp_path: Path) -> None:
    check = healthcheck(compose, "beat")
    env = worker_environment(COMMS_VAR_DIR=str(tmp_path / "var"))

    before = run_healthcheck(check, env)
    assert before.returncode != 0

    beat = CeleryProcess(env, tmp_path / "beat.log", "beat", "--loglevel=INFO")
    try:
        beat.wait_until_ready(
            lambda: run_healthcheck(check, env).returncode == 0, timeout=CHECK_TIMEOUT
        )
    finally:
        beat.stop()
    # The embedded default's scheduler starts without RedBeat's start-up hook failing on it.
    log = beat.log()
    assert "Signal handler" not in log and "Traceback" not in log, beat.tail()

    # A beat that stopped ticking is unhealthy once the check's age has passed.
    max_age = float(check["test"][check["test"].index("--max-age") + 1])
    stale = tmp_path / "var" / "beat-heartbeat"
    old = time.time() - max_age - 1
    os.utime(stale, (old, old))
    after = run_healthcheck(check, env)
    assert after.returncode != 0
    assert "beat last ticked" in after.stderr
