"""A claim whose worker died (its lease ran out) was an attempt, on PostgreSQL.

An email whose send kills its worker every time (a relay that takes the data and hangs
past the hard time limit, an out-of-memory kill) must not be claimed again for ever: each
lease that ran out counts as a failed attempt, and after ``MAX_ATTEMPTS`` the email is
``failed`` with a reason an operator can read, and ``email.failed`` is published.
A result the worker did record is counted once, by the recorder only.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

from sqlalchemy import Connection, Engine, event, select
from sqlalchemy.orm import Session

from comms_tasks.db import transaction
from comms_tasks.emails import delivery, send_results
from comms_tasks.mail.sender import SendResult
from comms_tasks.models import Email, EmailStatus, OutboxEvent
from comms_tasks.settings import get_settings
from tests import factories as f


def claim(now: dt.datetime, set_aside: dict[str, int] | None = None) -> list[int]:
    with transaction() as session:
        messages = delivery.prepare_batch(session, now, 100, get_settings(), set_aside=set_aside)
    return [message.email_id for message in messages]


def the_email(engine: Engine) -> Email:
    with Session(engine) as session:
        return session.scalars(select(Email)).one()


def failed_events(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as session:
        return [
            row.envelope
            for row in session.scalars(
                select(OutboxEvent).where(OutboxEvent.event_type == "email.failed")
            )
        ]


def test_an_email_that_kills_its_worker_every_time_ends_failed(domain_db: Connection) -> None:
    f.queue_plain_emails(domain_db, 1, "lease")
    lease = delivery.lease_duration(get_settings()) + dt.timedelta(seconds=1)
    now = dt.datetime.now(dt.UTC)
    for attempt in range(1, delivery.MAX_ATTEMPTS + 1):
        assert claim(now) == [the_email(domain_db).id], f"attempt {attempt}"
        # ... the worker dies here, nothing is recorded; the lease runs out.
        now += lease
        assert the_email(domain_db).retry_count == attempt - 1
    set_aside: dict[str, int] = {}
    assert claim(now, set_aside) == []
    assert set_aside == {"failed": 1}
    email = the_email(domain_db)
    assert email.status is EmailStatus.FAILED
    assert email.retry_count == delivery.MAX_ATTEMPTS
    assert email.lease_expires_at is None and email.next_attempt_at is None
    assert email.error_message == delivery.WORKER_LOST
    [event] = failed_events(domain_db)
    assert event["payload"]["email_id"] == email.id
    assert event["payload"]["reason"] == delivery.WORKER_LOST
    # Nothing claims it any more.
    assert claim(now + lease) == []


def test_a_lost_attempt_and_a_recorded_one_count_once_each(domain_db: Connection) -> None:
    f.queue_plain_emails(domain_db, 1, "lease")
    lease = delivery.lease_duration(get_settings()) + dt.timedelta(seconds=1)
    now = dt.datetime.now(dt.UTC)
    [email_id] = claim(now)
    now += lease
    assert claim(now) == [email_id]
    lost = the_email(domain_db)
    assert lost.retry_count == 1
    assert lost.error_message == delivery.WORKER_LOST
    result = SendResult(email_id=email_id, delivered=False, temporary=True, error="451 later")
    with transaction() as session:
        [recorded] = send_results.record_results(session, [(result, now)], random.Random(1))
    assert recorded.status is EmailStatus.QUEUED
    assert the_email(domain_db).retry_count == 2
    # Claimed again in time and delivered: no further count, the reason is cleared.
    waiting = the_email(domain_db)
    assert waiting.next_attempt_at is not None
    assert claim(waiting.next_attempt_at) == [email_id]
    delivered = SendResult(email_id=email_id, delivered=True)
    with transaction() as session:
        send_results.record_results(
            session, [(delivered, waiting.next_attempt_at)], random.Random(1)
        )
    sent = the_email(domain_db)
    assert sent.status is EmailStatus.SENT
    assert sent.retry_count == 2
    assert sent.error_message is None
    assert failed_events(domain_db) == []


def test_a_claim_moves_its_emails_in_one_statement(domain_db: Connection) -> None:
    """Queued to sending under the lease, the retention clock moved as track_activity
    moves it: one UPDATE for the whole claim, not one per email from the flush."""
    f.queue_plain_emails(domain_db, 3, "one-update")
    before = {email.id: email.last_activity_at for email in all_emails(domain_db)}
    updates: list[tuple[str, bool]] = []

    def note(_conn: Any, _cursor: Any, statement: str, _params: Any, _ctx: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("UPDATE"):
            updates.append((statement.split("SET")[0], many))

    now = dt.datetime.now(dt.UTC)
    event.listen(domain_db, "before_cursor_execute", note)
    try:
        claimed = claim(now)
    finally:
        event.remove(domain_db, "before_cursor_execute", note)
    assert sorted(claimed) == sorted(before)
    assert len(updates) == 1 and not updates[0][1], updates
    lease = delivery.lease_of_claim(now, get_settings())
    for email in all_emails(domain_db):
        assert (email.status, email.lease_expires_at) == (EmailStatus.SENDING, lease)
        assert email.last_activity_at > before[email.id]


def all_emails(connection: Connection) -> list[Email]:
    with Session(connection) as session:
        return list(session.scalars(select(Email)))
