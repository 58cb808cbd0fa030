"""A delivered result is prepared once per connection, and survives losing it.

PostgreSQL parsed and planned the recorder's statement for every result, about as long
as it took to run; the statement is now prepared once on the recorder's connection and
executed per result (``send_results.record_delivered``). A connection whose prepared
statement is gone (``DEALLOCATE``/``DISCARD ALL``, a pooler that hands each statement to
another server session) must still record every result.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg2.extensions
import pytest
from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from comms_tasks import db
from comms_tasks.db import transaction
from comms_tasks.emails import delivery, send_results
from comms_tasks.mail.message import OutgoingMessage
from comms_tasks.models import Email, EmailStatus, OutboxEvent
from comms_tasks.settings import get_settings
from tests import factories as f
from tests.conftest import terminate_backend


def claimed(engine: Engine, count: int, prefix: str) -> tuple[list[OutgoingMessage], dt.datetime]:
    f.queue_plain_emails(engine, count, prefix)
    claimed_at = dt.datetime.now(dt.UTC)
    with transaction() as session:
        messages = delivery.prepare_batch(session, claimed_at, 100, get_settings(), set_aside={})
    assert len(messages) == count
    return messages, delivery.lease_of_claim(claimed_at, get_settings())


def record(connection: Connection, message: OutgoingMessage, lease: dt.datetime) -> list[Any]:
    return send_results.record_delivered(
        connection,
        message.email_id,
        message.therapist_id,
        message.message_id,
        dt.datetime.now(dt.UTC),
        lease,
    )


def prepared_here(connection: Connection) -> list[tuple[str, int]]:
    """The statements this database session has prepared, with how often each ran."""
    return [
        (row.name, row.generic_plans + row.custom_plans)
        for row in connection.execute(
            text("SELECT name, generic_plans, custom_plans FROM pg_prepared_statements")
        )
    ]


def ours(connection: Connection) -> str:
    return send_results.prepared_name(connection.dialect)


def all_sent(engine: Engine, messages: list[OutgoingMessage]) -> None:
    ids = {message.email_id for message in messages}
    with Session(engine) as session:
        statuses = set(session.scalars(select(Email.status).where(Email.id.in_(ids))))
        events = session.scalars(
            select(OutboxEvent.envelope).where(OutboxEvent.event_type == "email.sent")
        ).all()
    assert statuses == {EmailStatus.SENT}
    assert sorted(envelope["payload"]["email_id"] for envelope in events) == sorted(ids)


def test_the_statement_is_prepared_once_and_run_per_result(committed_db: Engine) -> None:
    messages, lease = claimed(committed_db, 3, "prepared")
    with db.autocommit_connection() as connection:
        assert connection is not None
        for message in messages[:2]:
            assert [r.status for r in record(connection, message, lease)] == [EmailStatus.SENT]
        assert prepared_here(connection) == [(ours(connection), 2)]
    # The next claim takes the same connection from the pool: prepared already.
    with db.autocommit_connection() as connection:
        assert connection is not None
        assert [r.status for r in record(connection, messages[2], lease)] == [EmailStatus.SENT]
        assert prepared_here(connection) == [(ours(connection), 3)]
    all_sent(committed_db, messages)


def test_a_prepared_statement_dropped_since_is_prepared_again(committed_db: Engine) -> None:
    messages, lease = claimed(committed_db, 2, "dropped")
    with db.autocommit_connection() as connection:
        assert connection is not None
        record(connection, messages[0], lease)
        connection.execute(text("DEALLOCATE ALL"))  # as DISCARD ALL does
        assert [r.status for r in record(connection, messages[1], lease)] == [EmailStatus.SENT]
        assert prepared_here(connection) == [(ours(connection), 1)]
    all_sent(committed_db, messages)


class ForgetfulCursor(psycopg2.extensions.cursor):
    """A session that keeps no prepared statement: each is gone before the next
    statement, as behind a pooler that gives every statement another server session."""

    def execute(self, query: Any, vars: Any = None) -> None:
        super().execute(query, vars)
        if str(query).startswith("PREPARE"):
            super().execute("DEALLOCATE ALL")


def test_a_connection_that_keeps_no_prepared_statement_still_records(
    committed_db: Engine,
) -> None:
    messages, lease = claimed(committed_db, 3, "forgetful")
    with db.autocommit_connection() as connection:
        assert connection is not None
        raw = connection.connection.dbapi_connection
        raw.cursor_factory = ForgetfulCursor  # type: ignore[union-attr]
        try:
            for message in messages:
                assert [r.status for r in record(connection, message, lease)] == [EmailStatus.SENT]
        finally:
            raw.cursor_factory = psycopg2.extensions.cursor  # type: ignore[union-attr]
    all_sent(committed_db, messages)


def test_a_statement_another_release_prepared_on_the_session_is_not_run(
    committed_db: Engine,
) -> None:
    """A pooler's server session can outlive a deploy with the statement of the release
    before; a statement of another text is another name, never run for this one."""
    messages, lease = claimed(committed_db, 1, "release")
    with db.autocommit_connection() as connection:
        assert connection is not None
        for kept in ("comms_record_delivered", "comms_record_delivered_0123456789abcdef"):
            # As a release before might have prepared it: other parameters, another text.
            connection.execute(text(f"PREPARE {kept} (bigint) AS SELECT $1"))
        assert [r.status for r in record(connection, messages[0], lease)] == [EmailStatus.SENT]
        assert (ours(connection), 1) in prepared_here(connection)
        connection.execute(text("DEALLOCATE ALL"))
    all_sent(committed_db, messages)


def test_a_lost_connection_is_reported_and_dropped_as_any_other(committed_db: Engine) -> None:
    """Not the driver's bare error on a connection the pool would hand on."""
    messages, lease = claimed(committed_db, 1, "lost")
    with pytest.raises(OperationalError), db.autocommit_connection() as connection:
        assert connection is not None
        terminate_backend(committed_db, connection)
        try:
            record(connection, messages[0], lease)
        except OperationalError as exc:
            # The engine hides parameters from errors and logs; so does this one.
            assert messages[0].message_id not in str(exc)
            raise
        finally:
            assert connection.invalidated
