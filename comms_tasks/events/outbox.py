"""The transactional outbox: events are stored with the change, then relayed.

:func:`record_event` adds the event to the caller's transaction, so an event exists if
and only if its change committed. :func:`relay` publishes pending rows to the topic
exchange ``comms.events`` (routing key = event type) and marks them published; a row
whose publish fails stays pending and is tried again by the next relay. On RabbitMQ each
publish waits for the broker's confirm. Delivery is at least once: consumers deduplicate
by ``event_id``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from kombu import Connection, Exchange, Producer
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from comms_tasks.contracts.common import Contract
from comms_tasks.contracts.published import EVENTS_EXCHANGE, build_event
from comms_tasks.db import insert_rows
from comms_tasks.models import OutboxEvent
from comms_tasks.models.base import utcnow
from comms_tasks.settings import is_rabbitmq_url

log = logging.getLogger(__name__)

events_exchange = Exchange(EVENTS_EXCHANGE, type="topic", durable=True)

# How often one relay run retries a failing publish before leaving the rest for later.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5}
MAX_ERROR_LENGTH = 500


def outbox_row(payload: Contract, occurred_at: dt.datetime) -> dict[str, Any]:
    """The columns of the event's outbox row: its id, its type and its whole envelope."""
    envelope = build_event(payload, occurred_at=occurred_at)
    return {
        "event_id": envelope["event_id"],
        "event_type": envelope["event_type"],
        "envelope": envelope,
    }


def record_event(
    session: Session, payload: Contract, occurred_at: dt.datetime | None = None
) -> str:
    """Add one event to the current transaction; returns its event id."""
    row = outbox_row(payload, occurred_at or utcnow())
    session.add(OutboxEvent(**row))
    return str(row["event_id"])


def record_events(session: Session, payloads: Sequence[Contract], occurred_at: dt.datetime) -> None:
    """Add many events to the current transaction in one statement, in this order."""
    insert_rows(session, OutboxEvent, [outbox_row(payload, occurred_at) for payload in payloads])


@dataclasses.dataclass(frozen=True)
class RelayReport:
    published: int
    pending: int
    error: str | None = None


def _claim_pending(session: Session, limit: int) -> Sequence[OutboxEvent]:
    query = (
        select(OutboxEvent)
        .where(OutboxEvent.published_at.is_(None))
        .order_by(OutboxEvent.id)
        .limit(limit)
    )
    # Two relays at once each take different rows instead of publishing the same ones.
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return session.scalars(query).all()


def pending_count(session: Session) -> int:
    return (
        session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None))
        )
        or 0
    )


def publish_envelope(producer: Producer, envelope: dict[str, Any]) -> None:
    producer.publish(
        envelope,
        exchange=events_exchange,
        routing_key=envelope["event_type"],
        serializer="json",
        delivery_mode="persistent",
        message_id=envelope["event_id"],
        declare=[events_exchange],
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
    )


def relay(
    session: Session, broker_url: str, limit: int, transport_options: dict[str, Any]
) -> RelayReport:
    """Publish up to ``limit`` pending events in order; stop at the first failure."""
    rows = _claim_pending(session, limit)
    if not rows:
        return RelayReport(published=0, pending=0)
    published = 0
    error: str | None = None
    if is_rabbitmq_url(broker_url):
        # Publisher confirms: publish returns once RabbitMQ took the event (and raises on a
        # nack), so a row is marked published only after the broker confirmed it.
        transport_options = {**transport_options, "confirm_publish": True}
    try:
        connection = Connection(broker_url, transport_options=transport_options, connect_timeout=5)
        with connection as conn:
            conn.ensure_connection(max_retries=1, interval_start=0.2, timeout=10)
            producer = conn.Producer(serializer="json")
            for row in rows:
                publish_envelope(producer, row.envelope)
                row.published_at = utcnow()
                row.attempts += 1
                published += 1
    except Exception as exc:  # noqa: BLE001 - any broker failure leaves the rest pending
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH]
        failed = rows[published]
        failed.attempts += 1
        failed.last_error = error
        log.warning(
            "outbox relay stopped: %s (published %d, event %s left pending)",
            type(exc).__name__,
            published,
            failed.event_id,
        )
    return RelayReport(published=published, pending=len(rows) - published, error=error)
