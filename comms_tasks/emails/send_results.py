"""A send's results recorded, and a claim's unsent emails given back.

Each result is written as statements on the email's row (no ORM object loaded), guarded
by the row being ``sending`` under the claim's lease: a result or a release never touches
an email claimed again since (``delivery.lease_of_claim``) or cancelled.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import random
import re
from collections.abc import Sequence
from typing import Any, cast

import psycopg2.errors
from sqlalchemy import Connection, Dialect, Table, bindparam, insert, literal, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

from comms_tasks.contracts.published import EmailSentPayload
from comms_tasks.emails.delivery import (
    EMAILS,
    MAX_ATTEMPTS,
    MAX_ERROR_LENGTH,
    failed_event,
    failed_values,
    retry_values,
    sent_values,
)
from comms_tasks.events.outbox import outbox_row, record_events
from comms_tasks.mail.sender import SendResult
from comms_tasks.models import Email, EmailStatus, OutboxEvent
from comms_tasks.models.base import utcnow

OUTBOX = cast(Table, OutboxEvent.__table__)
# The columns a delivered result sets (delivery.sent_values).
SENT = tuple(sent_values(utcnow()))


@dataclasses.dataclass(frozen=True)
class Recorded:
    email_id: int
    status: EmailStatus


def record_results(
    session: Session,
    results: Sequence[tuple[SendResult, dt.datetime]],
    rng: random.Random,
    lease: dt.datetime | None = None,
) -> list[Recorded]:
    """Store several sends' results (each with when it came) at once.

    Emails no longer ours are skipped: an operator cancelled them, or, given the claim's
    ``lease`` (``delivery.lease_of_claim``), our lease ran out and another send claimed them
    (a worker paused past its lease must not overwrite the new claim's result). Written
    as statements on the rows, without loading them (one ``UPDATE … RETURNING`` and one
    event ``INSERT`` for a delivered email): the recorder commits one result per
    transaction, while the connection waits.
    """
    if len(results) > 1:
        # The rows locked in the order of their ids, as every writer of several does.
        session.execute(
            select(Email.id)
            .where(Email.id.in_([result.email_id for result, _ in results]))
            .order_by(Email.id)
            .with_for_update()
        )
    recorded = []
    for result, at in results:
        each = _record(session, result, at, rng, lease)
        if each is not None:
            recorded.append(each)
    return recorded


def record_delivered(
    connection: Connection,
    email_id: int,
    therapist_id: int,
    message_id: str,
    now: dt.datetime,
    lease: dt.datetime,
) -> list[Recorded]:
    """A delivered result as one statement (PostgreSQL, on an autocommit connection: one
    round trip, its own commit): the email's row updated as :func:`record_results` does,
    and its ``email.sent`` event inserted only if the row was still this claim's.

    The therapist and the Message-ID are the claim's (neither changes after the email is
    written); the guard is the same as :func:`record_results`'s.
    """
    event = outbox_row(
        EmailSentPayload(
            email_id=email_id, therapist_id=therapist_id, message_id=message_id, sent_at=now
        ),
        now,
    )
    params = {
        "email_id": email_id,
        "lease": lease,
        **{f"set_{name}": value for name, value in sent_values(now).items()},
        "activity_at": utcnow(),
        "updated_at": utcnow(),
        # Prefixed: a parameter named as a column of emails would be set on it too.
        **{f"outbox_{name}": value for name, value in event.items()},
        "outbox_created_at": utcnow(),
    }
    inserted = _execute_prepared(connection, params)
    return [] if inserted is None else [Recorded(email_id, EmailStatus.SENT)]


@functools.cache
def _delivered_statement() -> ReturningInsert[tuple[int]]:
    """``WITH sent AS (UPDATE emails … RETURNING id) INSERT INTO outbox … SELECT … FROM
    sent``, built once: its values are parameters."""
    emails, outbox = EMAILS.c, OUTBOX.c
    sent = (
        update(EMAILS)
        .where(emails.id == bindparam("email_id"))
        .where(emails.status == EmailStatus.SENDING)
        .where(emails.lease_expires_at == bindparam("lease"))
        .values(
            {
                **{name: bindparam(f"set_{name}", type_=emails[name].type) for name in SENT},
                "last_activity_at": bindparam("activity_at", type_=emails.last_activity_at.type),
                # Given, not left to the column's onupdate: the prepared form passes every
                # value itself.
                "updated_at": bindparam("updated_at", type_=emails.updated_at.type),
            }
        )
        .returning(emails.id)
        .cte("sent")
    )
    written = ("event_id", "event_type", "envelope", "created_at")
    event = select(
        *(bindparam(f"outbox_{name}", type_=outbox[name].type) for name in written),
        literal(0, outbox.attempts.type),
    ).select_from(sent)
    return insert(OUTBOX).from_select([*written, "attempts"], event).returning(outbox.id)


# Connection.info: whether the connection has the statement prepared (True), or cannot
# keep it (False: a pooler between us and PostgreSQL that keeps no prepared statement).
_PREPARED_KEY = "comms_record_delivered_prepared"


def _execute_prepared(connection: Connection, params: dict[str, Any]) -> Any:
    """:func:`_delivered_statement` with ``params``, prepared once per connection.

    Parsing and planning the statement took about as long as running it (measured: 0.37
    ms of planning against 0.55 ms of execution, docs/performance.md); ``PREPARE`` once
    and an ``EXECUTE`` per result leave PostgreSQL only the execution, and the recorder
    thread little of SQLAlchemy's per-statement work (the driver's cursor is used as it
    is: ``exec_driver_sql`` cost 0.07-0.1 ms a result more; its errors are reported as
    SQLAlchemy reports them, by :func:`_run`). A connection whose prepared statement is
    gone (``DISCARD ALL``) prepares it again; one that keeps none (a pooler in
    transaction mode) runs the statement as it is from then on.
    """
    prepared = connection.info.get(_PREPARED_KEY)
    if prepared is False:
        return connection.execute(_delivered_statement(), params).first()
    form = _prepared_form(connection.dialect)
    if prepared is None:
        _prepare(connection, form)
        connection.info[_PREPARED_KEY] = True
    values = form.values(params)
    for attempt in ("first", "again"):
        try:
            return _run(connection, form.execute, values)
        except DBAPIError as exc:
            if not isinstance(exc.orig, psycopg2.errors.InvalidSqlStatementName):
                raise
        if attempt == "first":
            # Gone since: prepared again once; if it is gone again, never again here.
            _prepare(connection, form)
    connection.info[_PREPARED_KEY] = False
    return connection.execute(_delivered_statement(), params).first()


def _run(connection: Connection, statement: str, values: tuple[Any, ...] | None) -> Any:
    """``statement`` on the driver's cursor; its row, if it returns one. A driver error is
    raised as SQLAlchemy raises it, and a lost connection is invalidated, so that the
    pool drops it rather than handing it on."""
    dbapi_connection = connection.connection.dbapi_connection
    cursor = dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        if values is None:
            cursor.execute(statement)  # as it is: nothing to format
        else:
            cursor.execute(statement, values)
        return cursor.fetchone() if cursor.description else None
    except psycopg2.Error as exc:
        disconnected = connection.dialect.is_disconnect(exc, dbapi_connection, cursor)
        if disconnected:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            statement,
            values,
            exc,
            psycopg2.Error,
            hide_parameters=connection.engine.hide_parameters,
            connection_invalidated=disconnected,
            dialect=connection.dialect,
        ) from exc
    finally:
        cursor.close()


def _prepare(connection: Connection, form: _PreparedForm) -> None:
    try:
        _run(connection, form.prepare, None)
    except DBAPIError as exc:
        # This database session has it already: the same text, since the name is the
        # text's hash (autocommit: nothing to roll back).
        if not isinstance(exc.orig, psycopg2.errors.DuplicatePreparedStatement):
            raise


def prepared_name(dialect: Dialect) -> str:
    """The prepared statement's name: its text's hash in it, so that a session that kept
    the statement of another release (a pooler's server connection across a deploy)
    never runs that one for this one."""
    return _prepared_form(dialect).name


@dataclasses.dataclass(frozen=True)
class _PreparedForm:
    name: str
    prepare: str  # PREPARE name (types) AS the statement, with $1, $2, … for its values
    execute: str  # EXECUTE name (%s, %s, …)
    compiled: Any  # the compiled statement: its parameters and their bind processors
    names: tuple[str, ...]  # the parameters in the order of $1, $2, …
    processors: tuple[Any, ...]

    def values(self, params: dict[str, Any]) -> tuple[Any, ...]:
        """The parameters as SQLAlchemy would send them (its bind processors applied)."""
        given = self.compiled.construct_params(params)
        return tuple(
            value if processor is None else processor(value)
            for value, processor in zip(
                (given[name] for name in self.names), self.processors, strict=True
            )
        )


@functools.cache
def _prepared_form(dialect: Dialect) -> _PreparedForm:
    """The ``PREPARE`` and ``EXECUTE`` of :func:`_delivered_statement`, from its SQL as
    SQLAlchemy compiles it for ``dialect``: one definition of the statement."""
    compiled = _delivered_statement().compile(dialect=dialect)
    names: list[str] = []

    def numbered(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    # Sent without parameters, so as it is: a literal % is no longer written twice.
    body = re.sub(r"%\((\w+)\)s", numbered, compiled.string).replace("%%", "%")
    binds = [compiled.binds[name] for name in names]
    types = ", ".join(dialect.type_compiler_instance.process(bind.type) for bind in binds)
    definition = f"({types}) AS {body}"
    name = f"comms_record_delivered_{hashlib.sha256(definition.encode()).hexdigest()[:16]}"
    return _PreparedForm(
        name=name,
        prepare=f"PREPARE {name} {definition}",
        execute=f"EXECUTE {name} ({', '.join(['%s'] * len(names))})",
        compiled=compiled,
        names=tuple(names),
        processors=tuple(bind.type.dialect_impl(dialect).bind_processor(dialect) for bind in binds),
    )


def _record(
    session: Session,
    result: SendResult,
    now: dt.datetime,
    rng: random.Random,
    lease: dt.datetime | None,
) -> Recorded | None:
    # Core statements on the table: no ORM objects, no session bookkeeping per result.
    connection = session.connection()
    emails = EMAILS.c
    ours = (emails.id == result.email_id) & (emails.status == EmailStatus.SENDING)
    if lease is not None:
        # Still under this claim's lease: not claimed again since (lease_of_claim).
        ours = ours & (emails.lease_expires_at == lease)
    # The statements bypass track_activity's hook: each moves the status, so the
    # retention clock moves with it here.
    if result.delivered:
        sent = connection.execute(
            update(EMAILS)
            .where(ours)
            .values(**sent_values(now), last_activity_at=utcnow())
            .returning(emails.therapist_id, emails.message_id)
        ).one_or_none()
        if sent is None:
            return None
        payload = EmailSentPayload(
            email_id=result.email_id,
            therapist_id=sent.therapist_id,
            message_id=sent.message_id,
            sent_at=now,
        )
        record_events(session, [payload], now)
        return Recorded(result.email_id, EmailStatus.SENT)
    error = (result.error or "unknown error")[:MAX_ERROR_LENGTH]
    attempted = connection.execute(
        update(EMAILS)
        .where(ours)
        .values(retry_count=emails.retry_count + 1, error_message=error, lease_expires_at=None)
        .returning(emails.retry_count, emails.therapist_id)
    ).one_or_none()
    if attempted is None:
        return None
    if result.temporary and attempted.retry_count < MAX_ATTEMPTS:
        values = retry_values(attempted.retry_count, now, rng)
    else:
        values = failed_values()
        record_events(session, [failed_event(result.email_id, attempted.therapist_id, error)], now)
    session.execute(
        update(Email).where(Email.id == result.email_id).values(**values, last_activity_at=utcnow())
    )
    return Recorded(result.email_id, values["status"])


def release(
    session: Session,
    email_ids: Sequence[int],
    now: dt.datetime,
    lease: dt.datetime | None = None,
) -> None:
    """Give claimed emails back at once (the task stops before sending them); given the
    claim's ``lease``, only those still under it (not claimed again since)."""
    statement = (
        update(Email)
        .where(Email.id.in_(email_ids))
        .where(Email.status == EmailStatus.SENDING)
        .values(status=EmailStatus.QUEUED, lease_expires_at=None, next_attempt_at=now)
    )
    if lease is not None:
        statement = statement.where(Email.lease_expires_at == lease)
    session.execute(statement)
