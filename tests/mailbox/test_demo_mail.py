"""The demo's mailbox: ``comms demo`` puts three answers to its past emails into the
Maildir, and a poll applies each as ``make run`` shows them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.mailbox.tasks import poll_mailbox
from comms_tasks.models import Email, InboundMail, InboundMailKind, InboundMailState
from comms_tasks.settings import get_settings
from tests.conftest import worker_environment

COMMS = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "comms"


def test_the_demo_answers_are_a_reply_an_out_of_office_and_a_bounce_applied_once(
    committed_db: Engine, committed_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    var = tmp_path / "var"
    env = worker_environment(COMMS_DATABASE_URL=committed_url, COMMS_VAR_DIR=str(var))

    def demo() -> dict[str, int]:
        done = subprocess.run(
            [str(COMMS), "demo", "--json"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert demo()["mailbox_messages"] == 3
    monkeypatch.setenv("COMMS_VAR_DIR", str(var))
    get_settings.cache_clear()

    assert poll_mailbox() == {"reply": 1, "auto_reply": 1, "bounce": 1}
    # A second demo on the demo's own data adds nothing, to the mailbox either.
    assert demo()["mailbox_messages"] == 0
    assert poll_mailbox() == {}

    with Session(committed_db) as session:
        mails = session.scalars(select(InboundMail).order_by(InboundMail.id)).all()
        assert [(m.kind, m.state, m.match_method) for m in mails] == [
            (InboundMailKind.REPLY, InboundMailState.MATCHED, "thread"),
            (InboundMailKind.AUTO_REPLY, InboundMailState.MATCHED, "thread"),
            (InboundMailKind.BOUNCE, InboundMailState.MATCHED, "thread"),
        ]
        reply, ooo, bounce = (session.get(Email, m.email_id) for m in mails)
        assert reply is not None and reply.response_received
        assert reply.response_content and "Februar" in reply.response_content
        assert "schrieb" not in reply.response_content
        assert ooo is not None and not ooo.response_received
        assert bounce is not None and bounce.bounce_permanent and bounce.bounce_status == "5.1.1"
