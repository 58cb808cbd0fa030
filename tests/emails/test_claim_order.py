"""A claim reads only the emails it takes, and takes them in claim order, on PostgreSQL.

One query for expired leases and queued emails together made PostgreSQL read every due
email and sort them all for the first hundred: while a backlog drained, a sequential
scan of ``emails`` (bodies and all) for every claim. Now a dead worker's emails are
taken first, then the due queued ones as two ranges of their partial index, and the
claim goes in claim order (due time, then id).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Iterator
from typing import Any, cast

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


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan's nodes, the top one first."""
    nodes = [plan]
    for child in plan.get("Plans", ()):
        nodes += plan_nodes(child)
    return nodes


@contextlib.contextmanager
def claim_queries(connection: Connection) -> Iterator[list[tuple[str, Any]]]:
    """The claim's locking queries run on ``connection`` inside the block, with their
    parameters."""
    seen: list[tuple[str, Any]] = []

    def note(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        if "FOR UPDATE SKIP LOCKED" in statement:
            seen.append((statement, params))

    event.listen(connection, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(connection, "before_cursor_execute", note)


def explained(connection: Connection, statement: str, params: Any, how: str) -> dict[str, Any]:
    """PostgreSQL's plan of ``statement`` (``EXPLAIN (how, FORMAT JSON)``), its top node."""
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    cursor.execute(f"EXPLAIN ({how}FORMAT JSON) " + statement, params)
    [[plan]] = cursor.fetchall()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return cast(dict[str, Any], plan[0]["Plan"])


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


def test_a_claim_with_nothing_due_reads_no_email_waiting_for_later(
    domain_db: Connection,
) -> None:
    """A relay outage: every queued email waits out its backoff, beside a history of sent
    emails (no retry time). The claim must find nothing due without reading them all."""
    fill(domain_db, 20_000, "sent", "NULL", "sent")
    fill(domain_db, 5_000, "queued", "now() + interval '5 minutes' + g * interval '1 s'", "later")
    domain_db.execute(text(f"ANALYZE {SCHEMA}.emails"))
    with claim_queries(domain_db) as selects, Session(domain_db) as session:
        now = dt.datetime.now(dt.UTC)
        assert delivery.claim_due(session, now, 100, get_settings(), None, {}) == []
    assert selects
    removed = sum(
        int(node.get("Rows Removed by Filter", 0))
        for statement, params in selects
        for node in plan_nodes(explained(domain_db, statement, params, "ANALYZE, "))
    )
    assert removed < 100, f"{removed} emails read and thrown away for a claim of none"


def test_the_queued_emails_are_read_in_index_order_without_a_sort(domain_db: Connection) -> None:
    f.queue_plain_emails(domain_db, 30, "plan")
    # The table as it is now (another test's rows, rolled back, can leave its size behind).
    domain_db.execute(text(f"ANALYZE {SCHEMA}.emails"))
    with claim_queries(domain_db) as seen:
        # More than are due: both queries of queued emails run.
        assert len(claim(dt.datetime.now(dt.UTC), 40)) == 30
    selects = [(st, params) for st, params in seen if "lease_expires_at <" not in st]
    assert len(selects) == 2  # the due ones with a time, then those without
    # A table this small would be scanned whatever the index: asked what the plan is
    # when scanning costs as a big table's would.
    domain_db.connection.dbapi_connection.cursor().execute(  # type: ignore[union-attr]
        "SET LOCAL enable_seqscan = off"
    )
    for statement, params in selects:
        nodes = [
            (node["Node Type"], node.get("Index Name"))
            for node in plan_nodes(explained(domain_db, statement, params, ""))
        ]
        assert ("Index Scan", "ix_emails_queued_next_attempt_at") in nodes, nodes
        assert not any(node == "Sort" for node, _ in nodes), nodes
