"""A real Flower on a real worker shows an inbound task by its ids, never its patient data.

SPEC §8/§10: Flower shows every task (task events on) and never a patient summary, even
when a careless sender passes the whole payload as ``kwargsrepr``. Flower listens to the
worker's events on the broker, as in production; nothing is mocked.

Flower also shows the ``task-sent`` event a sender publishes, with the sender's
``kwargsrepr``, until a worker has received the message: ``comms`` sends ids only there.
"""

from __future__ import annotations

import base64
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from comms_tasks.models import Patient
from tests import factories as f
from tests.cli.test_cli_call_outcome import call_id  # noqa: F401 - a fixture: a scheduled call
from tests.conftest import (
    PROJECT_ROOT,
    CeleryProcess,
    WorkerProcess,
    free_port,
    other_service,
    wait_for,
    worker_environment,
)

# A broker of its own (the broker_url fixture, on each kind): the session's worker must not
# take these messages.
BROKER_SLOT = 12
FLOWER_START_TIMEOUT = 30
# Direct connections to 127.0.0.1, whatever proxy the environment names.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class FlowerProcess(CeleryProcess):
    """``celery -A comms_tasks flower`` with basic auth on a free port, answering."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.auth = f"ops:{secrets.token_urlsafe(16)}"
        super().__init__(
            env,
            log_path,
            "flower",
            f"--port={self.port}",
            "--address=127.0.0.1",
            f"--basic-auth={self.auth}",
        )
        self.wait_until_ready(lambda: self.get("/healthcheck")[0] == 200, FLOWER_START_TIMEOUT)

    def get(self, path: str, *, auth: bool = True) -> tuple[int, str]:
        """Status and body of a GET; status 0 while nothing listens."""
        request = urllib.request.Request(self.base + path)
        if auth:
            token = base64.b64encode(self.auth.encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with OPENER.open(request, timeout=10) as response:
                return response.status, response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode("utf-8", errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, ""


def flower_environment(**overrides: str) -> dict[str, str]:
    """The worker's environment, without FLOWER_* settings of the machine running the
    tests (an unauthenticated API or other credentials must not leak in)."""
    env = worker_environment(**overrides)
    return {key: value for key, value in env.items() if not key.startswith("FLOWER_")}


def datatable_path(search: str = "") -> str:
    """The JSON the tasks page (/tasks) loads its rows from."""
    return "/tasks/datatable?" + urllib.parse.urlencode(
        {
            "draw": 1,
            "start": 0,
            "length": 100,
            "order[0][column]": 0,
            "order[0][dir]": "desc",
            "columns[0][data]": "received",
            "search[value]": search,
        }
    )


def test_flower_shows_inbound_task_by_ids_not_patient_data(
    committed_db: Engine, committed_url: str, broker_url: str, tmp_path: Path
) -> None:
    marker = "FLOWERMARK-" + uuid.uuid4().hex
    env = flower_environment(
        COMMS_DATABASE_URL=committed_url,
        COMMS_BROKER_URL=broker_url,
        COMMS_VAR_DIR=str(tmp_path / "var"),
    )
    worker_name = f"flowertest-{uuid.uuid4().hex[:8]}@localhost"
    worker = WorkerProcess(env, tmp_path / "worker.log", "-n", worker_name)
    flower: FlowerProcess | None = None
    sender = other_service(broker_url)
    try:
        flower = FlowerProcess(env, tmp_path / "flower.log")
        fl = flower  # for the closures below

        # Flower's event receiver is live once it has seen the worker's heartbeat (every
        # 2 s); a task sent before that would be missing from its state.
        def sees_worker() -> bool:
            fl.check_alive()
            status, body = fl.get("/metrics")
            return status == 200 and f'flower_worker_online{{worker="{worker_name}"}} 1.0' in body

        wait_for(sees_worker, explain=lambda: f"{fl.tail()}\n{worker.tail()}")

        event = f.request_created(
            91,
            patient_id=9100,
            diagnosis=marker,
            current_complaints=marker,
            time_availability=marker,
            symptoms_since=marker,
            therapy_experience=marker,
        )
        kwargs = {"event": event}
        # A careless sender puts the whole payload into the repr it sends along.
        result = sender.send_task(
            "comms.handle_matching_event", kwargs=kwargs, kwargsrepr=repr(kwargs)
        )
        task_id = result.id

        def applied() -> bool:
            with Session(committed_db) as session:
                patient = session.get(Patient, 9100)
                return patient is not None and patient.diagnosis == marker

        worker.wait_for(applied)

        def listed_as_succeeded() -> bool:
            fl.check_alive()
            status, body = fl.get("/api/tasks")
            return status == 200 and task_id in body and '"SUCCESS"' in body

        flower.wait_for(listed_as_succeeded, timeout=20)

        datatable = datatable_path()
        pages = {
            path: flower.get(path)
            for path in (
                "/api/tasks",
                f"/api/task/info/{task_id}",
                f"/task/{task_id}",
                "/tasks",
                datatable,
                "/api/workers",
                "/metrics",
            )
        }
        for path, (status, body) in pages.items():
            assert status == 200, f"{path}: HTTP {status}\n{body[:2000]}\n{flower.log()}"
            assert marker not in body, f"{path} shows patient data:\n{body[:4000]}"

        # The pages identify the message: the task and its event id are there.
        info = pages[f"/api/task/info/{task_id}"][1]
        assert event["event_id"] in info
        assert "placement_request.created" in info
        assert event["event_id"] in pages[f"/task/{task_id}"][1]
        assert task_id in pages[datatable][1]

        # Searching the task list for patient data finds nothing; for the event id, the task.
        def search(term: str) -> str:
            status, body = fl.get(datatable_path(term))
            assert status == 200, body
            return body

        assert task_id in search(event["event_id"])
        assert task_id not in search(marker)

        # /metrics answers without credentials in Flower 2.2 (see docs/operations.md).
        status, body = flower.get("/metrics", auth=False)
        assert status == 200 and marker not in body

        # Without credentials: nothing but 401.
        for path in ("/api/tasks", f"/api/task/info/{task_id}", f"/task/{task_id}", "/tasks"):
            status, body = flower.get(path, auth=False)
            assert status == 401, f"{path} without auth: HTTP {status}"
            assert marker not in body

        assert marker not in flower.log()
        assert marker not in worker.log()
    finally:
        sender.close()
        if flower is not None:
            flower.stop()
        worker.stop()


def test_flower_shows_no_call_notes_before_a_worker_received_the_outcome(
    broker_url: str,
    tmp_path: Path,
    committed_url: str,
    call_id: int,  # noqa: F811
) -> None:
    """No worker runs (all busy, or down): Flower knows the message from its sent event."""
    marker = "FLOWERMARK-" + uuid.uuid4().hex
    env = flower_environment(
        COMMS_BROKER_URL=broker_url,
        COMMS_VAR_DIR=str(tmp_path / "var"),
        COMMS_DATABASE_URL=committed_url,
    )
    flower = FlowerProcess(env, tmp_path / "flower.log")
    command = [sys.executable, "-c", "from comms_tasks.cli import main; main()", "calls"]
    command += ["outcome", str(call_id), "--status", "completed", "--notes", marker]
    try:

        def outcome_listed() -> bool:
            # Sent again until Flower's event receiver, which has no worker to show it is
            # connected, has caught one.
            subprocess.run(
                command,
                cwd=PROJECT_ROOT,
                env=env,
                check=True,
                capture_output=True,
                timeout=30,
            )
            return wait_for_listing(flower, "comms.record_call_outcome", timeout=3)

        flower.wait_for(outcome_listed)
        for path in ("/api/tasks", datatable_path()):
            status, body = flower.get(path)
            assert status == 200, body
            assert marker not in body, f"{path} shows the call's notes:\n{body[:2000]}"
    finally:
        flower.stop()


def wait_for_listing(flower: FlowerProcess, task_name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flower.check_alive()
        status, body = flower.get("/api/tasks")
        if status == 200 and task_name in body:
            return True
        time.sleep(0.2)
    return False
