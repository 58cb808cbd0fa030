"""The outbox: events stay while the broker is down, then are relayed exactly once each."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from comms_tasks.contracts.published import EmailQueuedPayload, published_event_model
from comms_tasks.db import transaction
from comms_tasks.events.outbox import record_event
from comms_tasks.events.tasks import relay_outbox
from comms_tasks.models import OutboxEvent
from comms_tasks.settings import get_settings
from tests.event_queue import bind_queue, drain, record_queued_events
from tests.servers import PrivateRedis


@pytest.fixture
def events_broker(
    private_redis: PrivateRedis, committed_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> PrivateRedis:
    monkeypatch.setenv("COMMS_EVENTS_BROKER_URL", private_redis.url)
    get_settings.cache_clear()
    return private_redis


def pending(engine: Engine) -> list[OutboxEvent]:
    with Session(engine) as session:
        return list(session.scalars(select(OutboxEvent).where(OutboxEvent.published_at.is_(None))))


def test_events_wait_while_redis_is_down_and_arrive_once_after(
    events_broker: PrivateRedis, committed_db: Engine
) -> None:
    before = record_queued_events(5, first_email_id=1)
    events_broker.stop()

    report = relay_outbox()
    assert report["published"] == 0
    assert report["error"]
    during = record_queued_events(3, first_email_id=100)
    rows = pending(committed_db)
    assert {row.event_id for row in rows} == set(before + during)
    assert max(row.attempts for row in rows) == 1

    events_broker.start()
    queue = bind_queue(events_broker.url)
    assert relay_outbox()["published"] == 8
    assert relay_outbox()["published"] == 0

    received = drain(events_broker.url, queue)
    counts = Counter(str(body["event_id"]) for body in received)
    assert counts == Counter({event_id: 1 for event_id in before + during})
    assert pending(committed_db) == []
    for body in received:
        assert body["producer"] == "communication-service"
        published_event_model("email.queued").model_validate(body)


def test_routing_key_is_the_event_type(events_broker: PrivateRedis, committed_db: Engine) -> None:
    only_sent = bind_queue(events_broker.url, "only-sent", routing_key="email.sent")
    record_queued_events(2, first_email_id=1)
    assert relay_outbox()["published"] == 2
    assert drain(events_broker.url, only_sent) == []


def test_an_event_is_stored_only_if_its_transaction_commits(committed_db: Engine) -> None:
    with pytest.raises(RuntimeError), transaction() as session:
        record_event(
            session,
            EmailQueuedPayload(email_id=9, therapist_id=1, placement_request_ids=[1]),
            occurred_at=dt.datetime(2026, 11, 2, tzinfo=dt.UTC),
        )
        raise RuntimeError("the change fails")
    assert pending(committed_db) == []
