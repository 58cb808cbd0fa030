"""A worker whose lease ran out neither records its result over the new claim nor
hands the new claim's email back.

Worker A claims, is paused past its lease (a threads or solo pool without hard limit, a
VM pause, clocks apart), worker B claims the email again. ``status is SENDING`` is true of
both claims; the claim's own lease (``delivery.lease_of_claim``) tells them apart.
Before, A's late 451 put the email back to ``queued`` while B sent it, B's result was then
skipped and the email sent once more; and A's release let a third claim send it beside B.
"""

from __future__ import annotations

import datetime as dt
import random

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from comms_tasks.db import transaction
from comms_tasks.emails import delivery, send_results
from comms_tasks.mail.sender import SendResult
from comms_tasks.models import Email, EmailStatus
from comms_tasks.settings import get_settings
from tests import factories as f


def claim(now: dt.datetime) -> list[int]:
    with transaction() as session:
        messages = delivery.prepare_batch(session, now, 100, get_settings(), set_aside={})
    return [m.email_id for m in messages]


def record(
    result: SendResult, at: dt.datetime, claimed_at: dt.datetime
) -> list[send_results.Recorded]:
    """As send_email records it: with the lease of the claim that sent it."""
    lease = delivery.lease_of_claim(claimed_at, get_settings())
    with transaction() as session:
        return send_results.record_results(session, [(result, at)], random.Random(1), lease)


def test_stale_worker_result_does_not_override_the_new_claim(domain_db: Connection) -> None:
    f.queue_plain_emails(domain_db, 1, "stale")
    lease = delivery.lease_duration(get_settings()) + dt.timedelta(seconds=1)
    now = dt.datetime.now(dt.UTC)
    [email_id] = claim(now)  # worker A claims
    [again] = claim(now + lease)  # A's lease ran out, worker B claims it
    assert again == email_id
    # A (paused past its lease, e.g. a threads/solo pool with no hard limit, a GC or VM
    # pause) comes back and records a 451 for its attempt: the email is not A's any more.
    stale = record(SendResult(email_id, False, temporary=True, error="451 later"), now + lease, now)
    # B delivers and records.
    fresh = record(SendResult(email_id, True), now + lease + dt.timedelta(seconds=2), now + lease)
    with Session(domain_db) as session:
        email = session.scalars(select(Email)).one()
        status = email.status
    assert status is EmailStatus.SENT, (
        f"B delivered it, but the email is {status.value} (fresh={fresh}): sent again later"
    )
    assert stale == [], f"A's result was applied to B's claim: {stale}"


def test_stale_worker_release_does_not_requeue_the_new_claim(domain_db: Connection) -> None:
    """send_email's stop path (soft time limit, time budget) releases what it did not
    record: never an email another worker is sending right now."""
    f.queue_plain_emails(domain_db, 1, "stale-release")
    lease = delivery.lease_duration(get_settings()) + dt.timedelta(seconds=1)
    now = dt.datetime.now(dt.UTC)
    [email_id] = claim(now)  # worker A
    assert claim(now + lease) == [email_id]  # worker B, A's lease ran out
    with transaction() as session:  # A stops and releases what it thinks is its
        send_results.release(
            session, [email_id], now + lease, delivery.lease_of_claim(now, get_settings())
        )
    # B is still sending it; nobody else may claim it.
    assert claim(now + lease + dt.timedelta(seconds=1)) == [], (
        "a third claim took the email B is sending"
    )
