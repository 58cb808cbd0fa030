"""A send result the recorder committed survives a crash of PostgreSQL (SPEC §9).

The recorder commits each result before the next message is handed over, so that a
crash leaves at most one accepted message per connection unrecorded. That holds only if
a commit is durable once it returns: with ``synchronous_commit = off`` (the recorder's
setting until stop 21) a crash of the server lost the results of its last ~200 ms, and
each of those emails was sent again. A private PostgreSQL (never the shared one) is
crashed (``pg_ctl -m immediate``) right after a claim's results were recorded; after
recovery every one of them is still there, with its ``email.sent`` event.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator

import pytest

from comms_tasks import migrate
from comms_tasks.db import make_engine, reset_engine, transaction
from comms_tasks.emails import delivery
from comms_tasks.emails.recording import ResultRecorder
from comms_tasks.mail.sender import SendResult
from comms_tasks.models import Email, EmailStatus, OutboxEvent
from comms_tasks.settings import get_settings
from tests import factories as f
from tests.conftest import count_rows
from tests.reliability.servers import PrivatePostgres

EMAILS = 60


@pytest.fixture
def crashable_db(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[PrivatePostgres, str]]:
    server = PrivatePostgres()
    server.start()
    try:
        url = server.create_database("comms")
        migrate.upgrade(url)
        monkeypatch.setenv("COMMS_DATABASE_URL", url)
        get_settings.cache_clear()
        reset_engine()
        yield server, url
    finally:
        reset_engine()
        get_settings.cache_clear()
        server.close()


def test_recorded_results_survive_a_crash_of_postgres(
    crashable_db: tuple[PrivatePostgres, str],
) -> None:
    server, url = crashable_db
    engine = make_engine(url)
    f.queue_plain_emails(engine, EMAILS, "crash")
    claimed_at = dt.datetime.now(dt.UTC)
    with transaction() as session:
        messages = delivery.prepare_batch(session, claimed_at, 100, get_settings(), set_aside={})
    assert len(messages) == EMAILS
    counts: dict[str, int] = {}
    lease = delivery.lease_of_claim(claimed_at, get_settings())
    with ResultRecorder(messages, counts, random.Random(1), lease) as recorder:
        for message in messages:
            recorder.add(SendResult(message.email_id, True))
    assert counts == {"sent": EMAILS}  # every result committed, as far as the service knows
    engine.dispose()
    reset_engine()
    server.crash()
    server.start()
    try:
        sent = count_rows(engine, Email, Email.status == EmailStatus.SENT)
        events = count_rows(engine, OutboxEvent, OutboxEvent.event_type == "email.sent")
        print(f"RELIABILITY postgres_crash: recorded={EMAILS} sent_after={sent} events={events}")
        assert (sent, events) == (EMAILS, EMAILS), (
            f"{EMAILS} results committed, {sent} sent and {events} events after the crash: "
            "the rest would be sent again"
        )
    finally:
        engine.dispose()
