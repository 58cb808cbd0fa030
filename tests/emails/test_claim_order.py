"""A claim reads the first queued emails in order and stops, on PostgreSQL.

One query for expired leases and queued emails together made PostgreSQL read every due
email and sort them all for the first hundred: while a backlog drained, a sequential
scan of ``emails`` (bodies and all) for every claim. Now the emails of a dead worker
come first, then the queued ones, read in order from their partial index.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import Connection, event, select, update
from sqlalchemy.orm import Session

from comms_tasks.db import transaction
from comms_tasks.emails import delivery
from comms_tasks.models import Email, EmailStatus
from comms_tasks.settings import get_settings
from tests import factories as f


def claim(now: dt.datetime, limit: int) -> list[int]:
    with transaction() as session:
        messages = delivery.prepare_batch(session, now, limit, get_settings(), set_aside={})
    return [message.email_id for message in messages]


def ids_by_attempt(connection: Connection) -> list[int]:
    with Session(connection) as session:
        return list(session.scalars(select(Email.id).order_by(Email.next_attempt_at, Email.id)))


def test_a_dead_workers_emails_first_then_queued_ones_in_order(domain_db: Connection) -> None:
    f.queue_plain_emails(domain_db, 5, "order")
    now = dt.datetime.now(dt.UTC)
    first, second, third, fourth, fifth = ids_by_attempt(domain_db)
    with Session(domain_db) as session, session.begin():
        # The last in line was claimed by a worker that died: its lease ran out.
        session.execute(
            update(Email)
            .where(Email.id == fifth)
            .values(status=EmailStatus.SENDING, lease_expires_at=now - dt.timedelta(minutes=1))
        )
    assert claim(now, 3) == [fifth, first, second]
    assert claim(now, 3) == [third, fourth]


def plan_nodes(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    nodes = [(plan["Node Type"], plan.get("Index Name"))]
    for child in plan.get("Plans", ()):
        nodes += plan_nodes(child)
    return nodes


def test_the_queued_emails_are_read_in_index_order_without_a_sort(domain_db: Connection) -> None:
    f.queue_plain_emails(domain_db, 30, "plan")
    selects: list[tuple[str, Any]] = []

    def note(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        if "FOR UPDATE SKIP LOCKED" in statement and "lease_expires_at <" not in statement:
            selects.append((statement, params))  # the queued emails' query

    event.listen(domain_db, "before_cursor_execute", note)
    try:
        assert len(claim(dt.datetime.now(dt.UTC), 10)) == 10
    finally:
        event.remove(domain_db, "before_cursor_execute", note)
    [(statement, params)] = selects
    cursor = domain_db.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    # A table this small would be scanned whatever the index: asked what the plan is
    # when scanning costs as a big table's would.
    cursor.execute("SET LOCAL enable_seqscan = off")
    cursor.execute("EXPLAIN (FORMAT JSON) " + statement, params)
    [[explained]] = cursor.fetchall()
    if isinstance(explained, str):
        explained = json.loads(explained)
    nodes = plan_nodes(explained[0]["Plan"])
    assert ("Index Scan", "ix_emails_queued_next_attempt_at") in nodes, nodes
    assert not any(node == "Sort" for node, _ in nodes), nodes
