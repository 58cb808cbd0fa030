"""Defects found by attack on the poll's groups (a commit per 50 messages) and on the
compat32 parsing; each test failed before its fix."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.emails.tasks import send_email
from comms_tasks.mailbox import tasks
from comms_tasks.mailbox.classify import classify
from comms_tasks.mailbox.tasks import poll_mailbox
from comms_tasks.models import Email, InboundMailState
from comms_tasks.models.base import utcnow
from tests import factories as f
from tests.emails.test_email_pipeline import (
    MATCHING,
    all_emails,
    apply,
    open_requests,
    run_batch,
    therapist,
)
from tests.mailbox.conftest import MaildirHarness
from tests.mailbox.samples import sample
from tests.mailbox.test_mailbox_hunt import PATIENT, PATIENT_ID, in_background, until_waiting
from tests.mailbox.test_poll import ADDRESS, T0, THERAPIST_ID, mails, sent_email
from tests.smtp import SmtpSink


def unmatched_quoting_reply() -> bytes:
    """A reply from a private address in a new message: matches nothing, quotes all."""
    return b"\n".join(
        line
        for line in sample("gmail_reply.eml", "").replace(b"antwort+@", b"antwort@").split(b"\n")
        if not line.lower().startswith((b"in-reply-to:", b"references:"))
    )


def erase_in_thread(errors: list[BaseException]) -> threading.Thread:
    return in_background(
        lambda: apply(PATIENT, f.patient_erased(PATIENT_ID, occurred_at=utcnow())), errors
    )


# --- 1. an erasure between two messages of one group --------------------------------------


def test_an_unmatched_reply_recorded_before_an_erasure_is_redacted_by_it(
    inbox: MaildirHarness,
    committed_db: Engine,
    smtp: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The poll records an unmatched reply (quoting the email); ``patient.erased`` arrives
    while the poll goes on with the next message of its group. The reply was read before
    the erasure: the erasure must redact it. Without a lock between them the erasure ran
    to its commit at once, before the group's commit made the reply visible."""
    email = sent_email(committed_db, smtp)
    inbox.append(unmatched_quoting_reply())
    inbox.append(sample("exchange_ooo.eml", email.reply_token or ""))
    recording = tasks.record
    erased: list[BaseException] = []
    threads: list[threading.Thread] = []

    def record_then_erase(*args: Any, **kwargs: Any) -> Any:
        applied = recording(*args, **kwargs)
        if not threads:
            threads.append(erase_in_thread(erased))
            # The erasure either waits for the poll or runs to its end; give it the time.
            until_waiting(threads[0], committed_db)
        return applied

    monkeypatch.setattr(tasks, "record", record_then_erase)

    poll_mailbox()
    threads[0].join(timeout=30)

    assert not threads[0].is_alive() and not erased, erased
    unmatched, _ooo = mails(committed_db)
    assert unmatched.state is InboundMailState.UNMATCHED
    assert (unmatched.raw, unmatched.reply_text) == (None, None), (
        "an unmatched reply read before the erasure keeps the patient's summary"
    )


# --- 2. a group locks emails in message order, the erasure in id order -------------------


def two_emails_about_one_patient(committed_db: Engine) -> tuple[Email, Email]:
    """Emails to therapists 7 and 8, both asking about patient 10_070, sent 8 days ago."""
    therapist(THERAPIST_ID, email=ADDRESS, last_name="Beispiel", first_name="Anna")
    therapist(8, email="b.zweite@praxis-zwei.example", last_name="Zweite", first_name="Berta")
    open_requests(THERAPIST_ID, range(70, 72))
    apply(
        MATCHING,
        f.request_created(
            80,
            patient_id=PATIENT_ID,
            therapist_id=8,
            created_at=T0 - dt.timedelta(days=29),
            registered_on="2026-09-01",
        ),
    )
    run_batch(T0)
    sent = 0
    for _ in range(4):
        sent += send_email().get("sent", 0)
        if sent == 2:
            break
    assert sent == 2
    with Session(committed_db) as session, session.begin():
        for row in session.scalars(select(Email)):
            row.sent_at = utcnow() - dt.timedelta(days=8)
    low, high = all_emails(committed_db)
    assert {b.placement_request_id for b in low.batches} & {70, 80}
    assert {b.placement_request_id for b in high.batches} & {70, 80}
    return low, high


def test_a_group_and_an_erasure_of_a_patient_in_two_of_its_emails_do_not_deadlock(
    inbox: MaildirHarness,
    committed_db: Engine,
    smtp: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Lock order everywhere: patient -> emails in id order. The group holds the lock of
    the email its first reply answers (the higher id) until its commit; the erasure
    locks the patient's emails in id order (gets the lower, waits for the higher); the
    group's second reply then waits for the lower: a cycle, one side aborted (40P01)."""
    low, high = two_emails_about_one_patient(committed_db)
    inbox.append(sample("thunderbird_reply.eml", high.reply_token or ""))
    time.sleep(0.01)
    inbox.append(
        sample("thunderbird_reply.eml", low.reply_token or "").replace(
            b"Message-ID: <", b"Message-ID: <second-"
        )
    )
    recording = tasks.record
    erased: list[BaseException] = []
    threads: list[threading.Thread] = []

    def record_then_erase(*args: Any, **kwargs: Any) -> Any:
        applied = recording(*args, **kwargs)
        if not threads:
            threads.append(erase_in_thread(erased))
            until_waiting(threads[0], committed_db)
        return applied

    monkeypatch.setattr(tasks, "record", record_then_erase)

    with caplog.at_level("WARNING", logger="comms_tasks.mailbox.tasks"):
        poll_mailbox()
    threads[0].join(timeout=30)

    deadlocks = [exc for exc in erased if "deadlock" in repr(exc).lower()]
    assert not erased, f"the erasure failed: {[type(e).__name__ for e in erased]} {deadlocks}"
    assert "rolled back" not in caplog.text, caplog.text


# --- 3. compat32: an RFC 2231 charset parameter -------------------------------------------


def test_a_reply_whose_charset_is_given_rfc2231_style_is_decoded_with_it() -> None:
    """``charset*=utf-8''utf-8`` (RFC 2231) is a valid Content-Type. Under compat32,
    ``get_param`` returns it as a (charset, language, value) tuple, which ``param()``
    drops: the body is read as us-ascii (cp1252) and the stored reply is mojibake. The
    old policy.default returned the decoded string."""
    raw = (
        b"From: Dr. Anna Beispiel <a.beispiel@praxis-beispiel.example>\r\n"
        b"To: antwort+k7q2m4xz3p5r6t7v2w3y4a5b6c@praxis-service.example\r\n"
        b"Subject: Re: Anfrage\r\nMessage-ID: <x1@praxis.example>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset*=utf-8''utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        + "Ich nehme Frau M\u00fcller gern auf. Gr\u00fc\u00dfe\r\n".encode()
    )
    classified = classify(raw)
    assert classified.reply_text is not None
    assert "Müller" in classified.reply_text, classified.reply_text
