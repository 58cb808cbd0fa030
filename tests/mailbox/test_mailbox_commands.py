"""``comms mailbox ...`` and ``comms emails respond``, run as an operator runs them."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.mailbox.tasks import poll_mailbox
from comms_tasks.models import Email, EmailBatch, EmailTemplate, InboundMailState
from comms_tasks.settings import get_settings
from tests.conftest import worker_environment
from tests.emails.test_email_pipeline import events_of
from tests.mailbox.conftest import MaildirHarness
from tests.mailbox.samples import BOUNCE_ADDRESS, REPLY_ADDRESS, sample
from tests.mailbox.test_poll import load, mails, sent_email
from tests.smtp import SmtpSink

COMMS = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "comms"
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def maildir(
    tmp_path: Path, smtp: SmtpSink, committed_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> MaildirHarness:
    harness = MaildirHarness(tmp_path / "mailbox")
    for name, value in {
        "COMMS_REPLY_ADDRESS": REPLY_ADDRESS,
        "COMMS_BOUNCE_ADDRESS": BOUNCE_ADDRESS,
        "COMMS_MAILBOX_BACKEND": "maildir",
        "COMMS_MAILBOX_DIR": str(harness.root),
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    return harness


@pytest.fixture
def comms(committed_url: str, tmp_path: Path) -> Run:
    env = worker_environment(COMMS_DATABASE_URL=committed_url, COMMS_VAR_DIR=str(tmp_path))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(COMMS), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    return run


def unmatched_reply(maildir: MaildirHarness, committed_db: Engine, smtp: SmtpSink) -> Email:
    """A reply without our token or thread, from an address nobody has: kept unmatched."""
    email = sent_email(committed_db, smtp)
    raw = (
        sample("thunderbird_reply.eml")
        .replace(b"a.beispiel@praxis-beispiel.example", b"fremd@anderswo.example")
        .replace(b"<4f1c2a9e8b7d4c6a9e0f1b2c3d4e5f60@praxis-service.example>", b"<x@y.example>")
    )
    maildir.append(raw)
    assert poll_mailbox() == {"reply": 1}
    [mail] = mails(committed_db)
    assert mail.state is InboundMailState.UNMATCHED
    return email


def test_an_operator_finds_an_unmatched_reply_reads_it_and_assigns_it(
    maildir: MaildirHarness, committed_db: Engine, smtp: SmtpSink, comms: Run
) -> None:
    email = unmatched_reply(maildir, committed_db, smtp)
    [mail] = mails(committed_db)

    listed = comms("mailbox", "list", "--unmatched", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert (row["id"], row["kind"], row["state"]) == (mail.id, "reply", "unmatched")
    assert row["received_at"].endswith(("+01:00", "+02:00"))

    masked = json.loads(comms("mailbox", "show", str(mail.id), "--json").stdout)
    assert masked["reply_text"] == "***" and masked["raw"] == "***"
    revealed = json.loads(comms("mailbox", "show", str(mail.id), "--reveal", "--json").stdout)
    assert mail.reply_text and revealed["reply_text"] == mail.reply_text
    assert revealed["raw"].startswith(("Return-Path", "Date", "Message-ID", "From", "To", "Subj"))

    assigned = comms("mailbox", "assign", str(mail.id), "--email", str(email.id))
    assert assigned.returncode == 0, assigned.stderr
    assert load(committed_db).response_received is True
    [after] = mails(committed_db)
    assert (after.state, after.email_id, after.match_method) == (
        InboundMailState.MATCHED,
        email.id,
        "operator",
    )
    again = comms("mailbox", "assign", str(mail.id), "--email", str(email.id))
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"error: mailbox message {mail.id} is already matched to email {email.id}"
    )


def test_ignore_marks_an_unmatched_message_and_unknown_ids_are_one_line(
    maildir: MaildirHarness, committed_db: Engine, smtp: SmtpSink, comms: Run
) -> None:
    unmatched_reply(maildir, committed_db, smtp)
    [mail] = mails(committed_db)
    assert comms("mailbox", "ignore", str(mail.id)).returncode == 0
    assert mails(committed_db)[0].state is InboundMailState.IGNORED
    missing = comms("mailbox", "show", "99999")
    assert (missing.returncode, missing.stderr.strip()) == (
        1,
        "error: mailbox message 99999 does not exist",
    )


def test_status_shows_the_mailbox_backlog_and_the_last_poll(
    maildir: MaildirHarness, committed_db: Engine, smtp: SmtpSink, comms: Run
) -> None:
    unmatched_reply(maildir, committed_db, smtp)
    snapshot = json.loads(comms("status", "--json").stdout)
    assert snapshot["mailbox"]["unmatched"] == 1
    assert snapshot["mailbox"]["last_poll_at"] is not None
    assert snapshot["mailbox"]["last_poll_error"] is None


def test_emails_respond_records_outcomes_per_request_and_queues_the_confirmation(
    maildir: MaildirHarness, committed_db: Engine, smtp: SmtpSink, comms: Run
) -> None:
    email = sent_email(committed_db, smtp)

    answered = comms(
        "emails",
        "respond",
        str(email.id),
        "--request",
        "70=accepted",
        "--request",
        "71=rejected",
        "--note",
        "per Fax",
    )

    assert answered.returncode == 0, answered.stderr
    with Session(committed_db) as session:
        outcomes = dict(
            session.execute(
                select(EmailBatch.placement_request_id, EmailBatch.response_outcome).where(
                    EmailBatch.email_id == email.id
                )
            ).all()
        )
        confirmations = session.scalars(
            select(Email).where(Email.template == EmailTemplate.CONFIRMATION)
        ).all()
    assert {key: value.value for key, value in outcomes.items() if value} == {
        70: "accepted",
        71: "rejected",
    }
    assert len(confirmations) == 1
    [event] = events_of(committed_db, "email.response_recorded")
    assert event["payload"]["source"] == "operator"


def test_emails_respond_refuses_a_request_named_twice_and_one_not_asked(
    maildir: MaildirHarness, committed_db: Engine, smtp: SmtpSink, comms: Run
) -> None:
    email = sent_email(committed_db, smtp)
    twice = comms(
        "emails", "respond", str(email.id), "--request", "70=accepted", "--request", "70=rejected"
    )
    assert twice.returncode == 2
    assert "--request" in twice.stderr and len(twice.stderr.strip().splitlines()) == 1
    not_asked = comms("emails", "respond", str(email.id), "--request", "99=accepted")
    assert not_asked.returncode == 1
    assert "not asked about in this email" in not_asked.stderr
    assert load(committed_db).response_received is False
