"""SMTP faults seen by a real worker: 550 fails at once, 451/drop/hang wait and retry.

20 queued emails to distinct recipients are drained by one real worker over SMTP. The
server refuses one recipient with 550, answers one DATA with 451, drops the connection on
another and never answers a third (the worker's SMTP timeout is 2 s). The refused email is
``failed`` with the server's reply; the three others go back to ``queued`` with one retry
counted and a retry time in the future; every other email reaches the server exactly once.
Once the retries are made due, they are sent too, and no message reaches the server twice.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.orm import Session

from comms_tasks.mail.message import new_message_id
from comms_tasks.models import Email, EmailStatus, EmailTemplate, Therapist
from tests import factories as f
from tests.conftest import WorkerProcess, broker_environment
from tests.smtp import SmtpSink

EMAILS = 20
BROKER_SLOT = 7  # the broker_url fixture: this module's broker, on each kind
REFUSED = 5  # therapist number whose recipient the server refuses with 550
# Answers to the DATA commands, in sending order (the refused recipient sends no DATA):
# emails 1, 2, 3, 4, 6, 7; the rest are accepted.
DATA_SCRIPT = ("250 OK", "451 4.3.0 Try again later", "250 OK", "drop", "250 OK", "hang")
TEMPORARY = {2: "451", 4: "drop", 7: "hang"}
DRAIN_TIMEOUT = 60
RESEND_INTERVAL_SECONDS = 5


def recipient(number: int) -> str:
    return f"praxis{number}@example.org"


def queue_emails(engine: Engine, count: int) -> dict[int, str]:
    """Queue ``count`` emails; returns the Message-ID of each, by therapist number."""
    now = dt.datetime.now(dt.UTC)
    message_ids = {
        number: new_message_id("anfragen@therapievermittlung.example")
        for number in range(1, count + 1)
    }
    rows = [
        {
            "therapist_id": number,
            "template": EmailTemplate.INITIAL_CONTACT,
            "dedup_key": f"faults:{number}",
            "recipient_email": recipient(number),
            "recipient_name": f"Praxis {number}",
            "sender_email": "anfragen@therapievermittlung.example",
            "sender_name": "Therapievermittlung",
            "subject": "Anfrage für einen Therapieplatz",
            "body_html": f"<p>{f.plain_body(number)}</p>",
            "body_text": f.plain_body(number),
            "message_id": message_id,
            "status": EmailStatus.QUEUED,
            "queued_at": now,
            "next_attempt_at": now,
        }
        for number, message_id in message_ids.items()
    ]
    addresses = {number: recipient(number) for number in message_ids}
    with Session(engine) as session, session.begin():
        session.execute(insert(Therapist), f.plain_therapist_rows(addresses))
        session.execute(insert(Email), rows)
    return message_ids


def emails_by_therapist(engine: Engine) -> dict[int, Email]:
    with Session(engine, expire_on_commit=False) as session:
        return {email.therapist_id: email for email in session.scalars(select(Email))}


def settled(engine: Engine) -> bool:
    """No email is being sent, and each one was attempted (sent, failed or retried)."""
    return all(
        email.status in (EmailStatus.SENT, EmailStatus.FAILED)
        or (email.status == EmailStatus.QUEUED and email.retry_count >= 1)
        for email in emails_by_therapist(engine).values()
    )


@pytest.mark.reliability
def test_smtp_faults_follow_the_retry_rules(
    broker_url: str, committed_db: Engine, committed_url: str, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    message_ids = queue_emails(committed_db, EMAILS)
    smtp_sink.refuse_recipient(recipient(REFUSED))
    smtp_sink.script(*DATA_SCRIPT)
    env = broker_environment(
        committed_url,
        broker_url,
        tmp_path / "var",
        **smtp_sink.worker_settings(),
        COMMS_SMTP_TIMEOUT="2",
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    app = Celery("operator", broker=broker_url, set_as_current=False)
    started = time.monotonic()
    try:
        # One task: one pool process sends the emails in order, so the script lines up.
        app.send_task("comms.send_email")
        worker.wait_for(lambda: settled(committed_db), timeout=DRAIN_TIMEOUT)
        first_round = emails_by_therapist(committed_db)
        first_counts = smtp_sink.message_ids()
        with committed_db.connect() as connection:
            retry_in_future = set(
                connection.execute(
                    select(Email.therapist_id).where(
                        Email.status == EmailStatus.QUEUED,
                        Email.retry_count == 1,
                        Email.next_attempt_at > func.now(),
                    )
                ).scalars()
            )

        refused = first_round[REFUSED]
        assert refused.status == EmailStatus.FAILED
        assert refused.error_message is not None and "550" in refused.error_message
        for number, fault in TEMPORARY.items():
            email = first_round[number]
            assert email.status == EmailStatus.QUEUED, (fault, email.error_message)
            assert email.retry_count == 1, fault
        assert retry_in_future == set(TEMPORARY)
        others = set(message_ids) - set(TEMPORARY) - {REFUSED}
        assert {n for n, e in first_round.items() if e.status == EmailStatus.SENT} == others
        assert first_counts == {message_ids[n]: 1 for n in others}

        # Make the retries due, as time would, and run the task again.
        with committed_db.begin() as connection:
            connection.execute(
                update(Email)
                .where(Email.status == EmailStatus.QUEUED)
                .values(next_attempt_at=func.now())
            )
        last_send = time.monotonic()
        app.send_task("comms.send_email")

        def retries_sent() -> bool:
            nonlocal last_send
            emails = emails_by_therapist(committed_db)
            if all(emails[n].status == EmailStatus.SENT for n in TEMPORARY):
                return True
            if time.monotonic() - last_send >= RESEND_INTERVAL_SECONDS:
                app.send_task("comms.send_email")
                last_send = time.monotonic()
            return False

        worker.wait_for(retries_sent, timeout=DRAIN_TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        worker.stop()
        app.close()

    final = emails_by_therapist(committed_db)
    assert final[REFUSED].status == EmailStatus.FAILED
    assert all(final[n].status == EmailStatus.SENT for n in set(message_ids) - {REFUSED})
    counts = smtp_sink.message_ids()
    assert counts == {message_ids[n]: 1 for n in set(message_ids) - {REFUSED}}
    faults = ", ".join(f"{fault}=retried" for fault in TEMPORARY.values())
    print(
        f"\nRELIABILITY smtp_faults: emails={EMAILS} sent={len(counts)} failed_550=1 "
        f"{faults} duplicates=0 seconds={elapsed:.1f}"
    )
