"""``comms demo`` loads its sample only into an empty database, or one that holds nothing
but the demo's own data (so ``make run`` works twice in a row); anything else needs
``--force``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from comms_tasks.appliers import APPLIERS
from comms_tasks.db import make_engine, transaction
from comms_tasks.inbound.inbox import handle
from comms_tasks.models import Email, Therapist
from comms_tasks.task_names import HANDLE_THERAPIST_EVENT
from tests import factories as f
from tests.conftest import PROJECT_ROOT, worker_environment

COMMS = Path(sys.executable).parent / "comms"


def comms(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(COMMS), *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def messages_sent(var_dir: Path) -> int:
    """Messages in the embedded filesystem broker under ``var_dir``: no worker takes them."""
    folder = var_dir / "broker" / "queue"
    return len(list(folder.glob("*.msg"))) if folder.exists() else 0


def a_therapist_written_directly() -> None:
    with transaction() as session:
        f.make_therapist(session, 1)


def a_therapist_from_the_therapist_service() -> None:
    outcome = handle(
        HANDLE_THERAPIST_EVENT, f.therapist_upserted(4242), APPLIERS[HANDLE_THERAPIST_EVENT]
    )
    assert outcome.result == "applied", outcome


def count(engine: Engine, model: type) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


@pytest.mark.parametrize(
    "existing", [a_therapist_written_directly, a_therapist_from_the_therapist_service]
)
def test_demo_refuses_a_database_with_data_of_its_own_unless_forced(
    committed_db: Engine,
    committed_url: str,
    tmp_path: Path,
    existing: object,
) -> None:
    assert callable(existing)
    existing()
    env = worker_environment(COMMS_DATABASE_URL=committed_url, COMMS_VAR_DIR=str(tmp_path))

    refused = comms(env, "demo")

    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stdout == ""
    [line] = refused.stderr.splitlines()
    assert line.startswith("error: the database at postgresql")
    assert "1 therapist" in line and "--force" in line
    assert messages_sent(tmp_path) == 0
    assert count(committed_db, Email) == 0

    forced = comms(env, "demo", "--force", "--json")

    assert forced.returncode == 0, forced.stderr
    assert messages_sent(tmp_path) == 150
    assert count(committed_db, Email) > 0


def test_make_run_twice_on_the_same_embedded_database(tmp_path: Path) -> None:
    """`make run`: db upgrade, demo, run; then the same again on the same ./var."""
    env = worker_environment(COMMS_VAR_DIR=str(tmp_path / "var"), COMMS_LOG_LEVEL="WARNING")
    assert comms(env, "db", "upgrade").returncode == 0
    first = comms(env, "demo")
    assert first.returncode == 0, first.stderr
    ran = comms(env, "run", "--batch-now", "--until-idle", "--for", "100", timeout=150)
    assert ran.returncode == 0, ran.stderr[-3000:]
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'comms.db'}")
    emails_after_the_first_run = count(engine, Email)
    assert count(engine, Therapist) == 30 and emails_after_the_first_run > 5

    assert comms(env, "db", "upgrade").returncode == 0
    again = comms(env, "demo")

    assert again.returncode == 0, again.stderr
    # The same messages: the inbox has applied them already; the past is not recorded twice.
    assert count(engine, Therapist) == 30
    assert count(engine, Email) == emails_after_the_first_run
    engine.dispose()
