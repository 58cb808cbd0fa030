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

from sqlalchemy import Connection, event, select, text, update
from sqlalchemy.orm import Session

from comms_tasks.db import transaction
from comms_tasks.emails import delivery
from comms_tasks.models import Email, EmailStatus
from comms_tasks.models.base import SCHEMA
from comms_tasks.settings import get_settings
from tests import factories as f


def claim(now: dt.datetime, limit: int) -> list[int]:
    with transaction() as session:
        messages = delivery.prepare_batch(session, now, limit, get_settings(), set_aside={})
    return [message.email_id for message in messages]


def ids_by_attempt(connection: Connection) -> list[int]:
    with Session(connection) as session:
        return list(session.scalars(select(Email.id).order_by(Email.next_attempt_at, Email.id)))


def test_a_dead_workers_emails_are_taken_first_and_go_in_claim_order(
    domain_db: Connection,
) -> None:
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
    # Taken before queued emails due earlier, sent in claim order (due time, then id).
    assert claim(now, 3) == [first, second, fifth]
    assert claim(now, 3) == [third, fourth]


def plan_nodes(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    nodes = [(plan["Node Type"], plan.get("Index Name"))]
    for child in plan.get("Plans", ()):
        nodes += plan_nodes(child)
    return nodes


def fill(connection: Connection, count: int, status: str, next_attempt_at: str, tag: str) -> None:
    """``count`` emails in one statement, as many as a table in production holds."""
    connection.execute(
        text(
            f"""INSERT INTO {SCHEMA}.emails (therapist_id, template, dedup_key,
            recipient_email, recipient_name, sender_email, sender_name, subject, body_html,
            body_text, message_id, status, queued_at, next_attempt_at, retry_count,
            last_activity_at, created_at, updated_at)
            SELECT g, 'initial_contact', '{tag}' || g, 'a' || g || '@example.org', 'n',
            's@example.org', 's', 'subject', 'html', 'text', '<{tag}' || g || '@example.org>',
            '{status}', now(), {next_attempt_at}, 0, now(), now(), now()
            FROM generate_series(1, {count}) g"""
        )
    )


def removed_by_filter(plan: dict[str, Any]) -> int:
    return int(plan.get("Rows Removed by Filter", 0)) + sum(
        removed_by_filter(child) for child in plan.get("Plans", ())
    )


def test_a_claim_with_nothing_due_reads_no_email_waiting_for_later(
    domain_db: Connection,
) -> None:
    """A relay outage: every queued email waits out its backoff, beside a history of sent
    emails (no retry time). The claim must find nothing due without reading them all."""
    fill(domain_db, 20_000, "sent", "NULL", "sent")
    fill(domain_db, 5_000, "queued", "now() + interval '5 minutes' + g * interval '1 s'", "later")
    domain_db.execute(text(f"ANALYZE {SCHEMA}.emails"))
    selects: list[tuple[str, Any]] = []

    def note(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        if "FOR UPDATE SKIP LOCKED" in statement:
            selects.append((statement, params))

    event.listen(domain_db, "before_cursor_execute", note)
    try:
        with Session(domain_db) as session:
            now = dt.datetime.now(dt.UTC)
            assert delivery.claim_due(session, now, 100, get_settings(), None, {}) == []
    finally:
        event.remove(domain_db, "before_cursor_execute", note)
    assert selects
    cursor = domain_db.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    removed = 0
    for statement, params in selects:
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params)
        [[explained]] = cursor.fetchall()
        if isinstance(explained, str):
            explained = json.loads(explained)
        removed += removed_by_filter(explained[0]["Plan"])
    assert removed < 100, f"{removed} emails read and thrown away for a claim of none"


def test_the_queued_emails_are_read_in_index_order_without_a_sort(domain_db: Connection) -> None:
    f.queue_plain_emails(domain_db, 30, "plan")
    # The table as it is now (another test's rows, rolled back, can leave its size behind).
    domain_db.execute(text(f"ANALYZE {SCHEMA}.emails"))
    selects: list[tuple[str, Any]] = []

    def note(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        if "FOR UPDATE SKIP LOCKED" in statement and "lease_expires_at <" not in statement:
            selects.append((statement, params))  # the queued emails' query

    event.listen(domain_db, "before_cursor_execute", note)
    try:
        # More than are due: both queries run.
        assert len(claim(dt.datetime.now(dt.UTC), 40)) == 30
    finally:
        event.remove(domain_db, "before_cursor_execute", note)
    assert len(selects) == 2  # the due ones with a time, then those without
    cursor = domain_db.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    # A table this small would be scanned whatever the index: asked what the plan is
    # when scanning costs as a big table's would.
    cursor.execute("SET LOCAL enable_seqscan = off")
    for statement, params in selects:
        cursor.execute("EXPLAIN (FORMAT JSON) " + statement, params)
        [[explained]] = cursor.fetchall()
        if isinstance(explained, str):
            explained = json.loads(explained)
        nodes = plan_nodes(explained[0]["Plan"])
        assert ("Index Scan", "ix_emails_queued_next_attempt_at") in nodes, nodes
        assert not any(node == "Sort" for node, _ in nodes), nodes
