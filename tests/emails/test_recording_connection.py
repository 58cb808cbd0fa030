"""The recorder's one connection, and a delivered result written as one statement on it.

On PostgreSQL the recorder thread writes each delivered result as one statement on a
connection of its own in autocommit mode (``db.autocommit_connection``,
``send_results.record_delivered``), each commit waiting for its WAL flush as any other. What that
statement writes must be what the general path (``record_results``, one transaction)
writes; the connection must go back to the pool as it came.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from comms_tasks import db
from comms_tasks.db import transaction
from comms_tasks.emails import delivery, send_results
from comms_tasks.emails.recording import RecordingFailedError, ResultRecorder
from comms_tasks.emails.tasks import send_email
from comms_tasks.mail.message import OutgoingMessage
from comms_tasks.mail.sender import SendResult
from comms_tasks.models import Email, EmailStatus, OutboxEvent
from comms_tasks.settings import get_settings
from tests import factories as f
from tests.conftest import terminate_backend
from tests.smtp import SmtpSink

# The columns a delivered result writes, besides the clocks compared on their own.
WRITTEN = ("status", "sent_at", "lease_expires_at", "next_attempt_at", "error_message")


def two_clocks(connection: Connection) -> tuple[object, object]:
    # now() is the transaction's start: two statements of one transaction agree.
    first = connection.scalar(text("SELECT now()"))
    time.sleep(0.01)
    return first, connection.scalar(text("SELECT now()"))


def test_the_recorders_connection_goes_back_to_the_pool_as_it_came(committed_db: Engine) -> None:
    with db.autocommit_connection() as connection:
        assert connection is not None
        # Each result's commit is durable: a crash of PostgreSQL loses none (SPEC §9).
        assert connection.scalar(text("SHOW synchronous_commit")) == "on"
        first, second = two_clocks(connection)
        assert first != second, "not in autocommit: both statements in one transaction"
    engine = db.get_engine()
    assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    with engine.connect() as connection:
        first, second = two_clocks(connection)
        assert first == second, "the pool handed on a connection still in autocommit"


def claim(now: dt.datetime) -> list[OutgoingMessage]:
    with transaction() as session:
        return delivery.prepare_batch(session, now, 100, get_settings(), set_aside={})


def rows(engine: Engine) -> dict[int, Email]:
    with Session(engine) as session:
        return {email.id: email for email in session.scalars(select(Email))}


def sent_events(engine: Engine) -> dict[int, dict[str, Any]]:
    with Session(engine) as session:
        envelopes = session.scalars(
            select(OutboxEvent.envelope).where(OutboxEvent.event_type == "email.sent")
        )
        return {envelope["payload"]["email_id"]: envelope for envelope in envelopes}


def test_one_statement_writes_what_the_general_path_writes(committed_db: Engine) -> None:
    f.queue_plain_emails(committed_db, 2, "one-statement")
    claimed_at = dt.datetime.now(dt.UTC)
    general, single = claim(claimed_at)
    lease = delivery.lease_of_claim(claimed_at, get_settings())
    before = rows(committed_db)
    at = claimed_at + dt.timedelta(seconds=1)
    with transaction() as session:
        by_general = send_results.record_results(
            session, [(SendResult(general.email_id, True), at)], random.Random(1), lease
        )
    with db.autocommit_connection() as connection:
        assert connection is not None
        by_single = send_results.record_delivered(
            connection, single.email_id, single.therapist_id, single.message_id, at, lease
        )
    assert [r.status for r in by_general] == [r.status for r in by_single] == [EmailStatus.SENT]
    after = rows(committed_db)
    for column in WRITTEN:
        assert getattr(after[single.email_id], column) == getattr(
            after[general.email_id], column
        ), column
    for email in (general, single):
        row = after[email.email_id]
        assert row.sent_at == at
        # The retention clock and the row's own clock moved with the status.
        assert row.last_activity_at > before[email.email_id].last_activity_at
        assert row.updated_at > before[email.email_id].updated_at
    events = sent_events(committed_db)
    assert set(events) == {general.email_id, single.email_id}
    one, other = events[general.email_id], events[single.email_id]
    assert one.keys() == other.keys()
    assert one["event_type"] == other["event_type"] == "email.sent"
    assert one["occurred_at"] == other["occurred_at"]
    assert other["payload"] == {
        **one["payload"],
        "email_id": single.email_id,
        "therapist_id": single.therapist_id,
        "message_id": single.message_id,
    }
    assert other["payload"]["therapist_id"] == after[single.email_id].therapist_id
    assert other["payload"]["message_id"] == after[single.email_id].message_id


def test_one_statement_leaves_an_email_no_longer_the_claims(committed_db: Engine) -> None:
    """A stale lease (claimed again since) or a cancelled email: no change, no event."""
    f.queue_plain_emails(committed_db, 2, "not-ours")
    claimed_at = dt.datetime.now(dt.UTC)
    stale, cancelled = claim(claimed_at)
    lease = delivery.lease_of_claim(claimed_at, get_settings())
    with Session(committed_db) as session, session.begin():
        session.execute(
            update(Email).where(Email.id == cancelled.email_id).values(status=EmailStatus.CANCELLED)
        )
    before = rows(committed_db)
    at = claimed_at + dt.timedelta(seconds=1)
    with db.autocommit_connection() as connection:
        assert connection is not None
        for message, its_lease in (
            (stale, lease - dt.timedelta(seconds=1)),  # another claim's lease
            (cancelled, lease),
        ):
            recorded = send_results.record_delivered(
                connection,
                message.email_id,
                message.therapist_id,
                message.message_id,
                at,
                its_lease,
            )
            assert recorded == [], message.email_id
    after = rows(committed_db)
    for email_id, row in before.items():
        assert (after[email_id].status, after[email_id].updated_at) == (
            row.status,
            row.updated_at,
        )
    assert sent_events(committed_db) == {}


def test_the_recorder_writes_delivered_and_failed_results(committed_db: Engine) -> None:
    """Through the recorder thread: a delivered result by the one statement, a failure
    by the general path, each committed before the next is taken."""
    f.queue_plain_emails(committed_db, 2, "recorder")
    claimed_at = dt.datetime.now(dt.UTC)
    messages = claim(claimed_at)
    counts: dict[str, int] = {}
    lease = delivery.lease_of_claim(claimed_at, get_settings())
    delivered, refused = messages
    with ResultRecorder(messages, counts, random.Random(1), lease) as recorder:
        recorder.add(SendResult(delivered.email_id, True))
        recorder.wait()
        assert rows(committed_db)[delivered.email_id].status is EmailStatus.SENT
        recorder.add(SendResult(refused.email_id, False, temporary=False, error="550 no"))
    assert counts == {"sent": 1, "failed": 1}
    assert recorder.unrecorded == set()
    after = rows(committed_db)
    assert after[refused.email_id].status is EmailStatus.FAILED
    assert after[refused.email_id].error_message == "550 no"
    assert set(sent_events(committed_db)) == {delivered.email_id}
    assert db.get_engine().pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_connection_lost_in_the_block_raises_its_own_error(committed_db: Engine) -> None:
    """Not the reset's PendingRollbackError on the way out, which would hide it."""
    with pytest.raises(OperationalError), db.autocommit_connection() as connection:
        assert connection is not None
        terminate_backend(committed_db, connection)
        connection.execute(text("SELECT 1"))
    with db.get_engine().connect() as connection:  # the lost one dropped, not handed on
        first, second = two_clocks(connection)
        assert first == second, "the pool handed on a connection still in autocommit"


def test_a_database_restart_during_a_claim_stops_the_send_cleanly(
    committed_db: Engine, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorder's connection is lost between two delivered results: the send stops
    with RecordingFailedError, and the recorder thread ends without an error of its own."""
    f.queue_plain_emails(committed_db, 3, "restart")
    real = send_results.record_delivered
    calls: list[int] = []

    def record_delivered(connection: Connection, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            terminate_backend(committed_db, connection)
        return real(connection, *args)

    monkeypatch.setattr(send_results, "record_delivered", record_delivered)
    escaped: list[BaseException | None] = []
    previous = threading.excepthook
    threading.excepthook = lambda arguments: escaped.append(arguments.exc_value)
    try:
        with pytest.raises(RecordingFailedError):
            send_email()
    finally:
        threading.excepthook = previous
    assert escaped == [], f"the recorder thread died with: {escaped!r}"
    after = rows(committed_db)
    assert after[min(after)].status is EmailStatus.SENT  # recorded before the loss
