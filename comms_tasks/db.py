"""Engine, session factory, and one transaction per task.

PostgreSQL keeps every table in the schema ``communication_service``. SQLite has no
schemas, so on SQLite the schema name is translated away (``schema_translate_map``);
the models and migrations name the schema once and work on both.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from comms_tasks import database_urls
from comms_tasks.models.base import SCHEMA
from comms_tasks.settings import ConfigurationError, get_settings

# Seconds to wait for PostgreSQL to answer a new connection: a host that drops packets
# fails start-up in this time instead of the system's TCP timeout (minutes).
CONNECT_TIMEOUT_SECONDS = 10


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def schema_translation(url: str) -> dict[str | None, str | None]:
    return {SCHEMA: None} if is_sqlite(url) else {}


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the schema mapping and per-dialect settings applied.

    Every engine of the service is made here, so ``postgresql://`` means the installed
    driver everywhere (see :func:`~comms_tasks.database_urls.database_url_for_driver`).
    """
    url = database_urls.database_url_for_driver(url)
    # Statement parameters may be patient data: database errors must not repeat them.
    kwargs.setdefault("hide_parameters", True)
    if is_sqlite(url):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            from pathlib import Path

            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    else:
        kwargs.setdefault("pool_pre_ping", True)
        if "poolclass" not in kwargs:
            kwargs.setdefault("pool_size", 5)
            kwargs.setdefault("max_overflow", 5)
        if "connect_timeout" not in url:
            kwargs.setdefault("connect_args", {"connect_timeout": CONNECT_TIMEOUT_SECONDS})
        engine = create_engine(url, **kwargs)
    return engine.execution_options(schema_translate_map=schema_translation(url))


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy issue BEGIN itself, so "BEGIN IMMEDIATE" below takes the write lock
    # at the start of each transaction: SQLite then serializes writers as PostgreSQL's
    # row locks would, instead of failing one of them at commit.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # The worker's processes share one file: wait up to 30 s for the lock, not fail.
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


@functools.cache
def get_engine() -> Engine:
    return make_engine(get_settings().effective_database_url)


@functools.cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def connection_failure(error: BaseException, url: str) -> str | None:
    """One line naming ``COMMS_DATABASE_URL`` if ``error`` is a failure to connect, else None.

    A DBAPI error raised while connecting carries no statement; one raised by a
    statement (a missing table, a constraint) is not about the URL. The password never
    appears: the URL is shown masked, and the driver's message never quotes it.
    """
    if not isinstance(error, DBAPIError) or error.statement is not None:
        return None
    lines = str(error.orig or error).strip().splitlines() or ["no reason given"]
    reason = lines[0].strip()
    password = _password_of(url)
    if password:
        reason = reason.replace(password, "***")
    return f"COMMS_DATABASE_URL: cannot connect to {database_urls.safe_database_url(url)}: {reason}"


def _password_of(url: str) -> str | None:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password
    except ValueError:
        return None


def check_database() -> None:
    """Connect once to the configured database; :class:`ConfigurationError` if we cannot.

    Worker, beat and ``comms run`` call it at start-up, so a wrong URL stops them with
    one line instead of failing every task later.
    """
    url = get_settings().effective_database_url
    # An engine of its own, without a pool: nothing of the check is kept, so a worker
    # forks its pool after it with no connection to share.
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        reason = connection_failure(exc, url)
        if reason is None:
            raise
        raise ConfigurationError(reason) from None
    finally:
        engine.dispose()


def reset_engine() -> None:
    """Forget the engine (after a fork, or when tests change the configuration)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
    get_engine.cache_clear()
    _session_factory.cache_clear()


_held: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "comms_held_connection", default=None
)


@contextlib.contextmanager
def one_connection() -> Iterator[None]:
    """The block's transactions, one after the other, on one connection from the pool.

    A task of a few short transactions (an inbound message: its start count, then the
    message) checks a connection out, and pings it, once instead of once per
    transaction. Each :func:`transaction` still commits or rolls back on its own; one
    opened while another is open, or after the connection was lost, takes a connection of
    its own from the pool as it would without the block.
    """
    try:
        connection = get_engine().connect()
    except DBAPIError:
        # The database is away: each transaction meets the outage itself, as without it.
        yield
        return
    with connection:
        held = _held.set(connection)
        try:
            yield
        finally:
            _held.reset(held)


def transaction() -> contextlib.AbstractContextManager[Session]:
    """One unit of work: commit on success, roll back on any error; the session is closed."""
    connection = _held.get()
    if connection is None or connection.invalidated or connection.in_transaction():
        return _session_factory().begin()
    return _on_connection(connection)


@contextlib.contextmanager
def _on_connection(connection: Connection) -> Iterator[Session]:
    with Session(bind=connection, expire_on_commit=False) as session, session.begin():
        # Begun now, not at the first statement: a transaction opened inside this one sees
        # the connection taken and goes to the pool.
        session.connection()
        yield session


@contextlib.contextmanager
def autocommit_connection() -> Iterator[Connection | None]:
    """A PostgreSQL connection of its own on which each statement is its own transaction;
    ``None`` where there is none to have (SQLite, or every session already sharing one
    connection, as in the domain tests).

    For a thread that writes many small changes, each one statement, one after the other
    (a claim's delivered results): the connection is taken from the pool once, and each
    change is one round trip — no ``BEGIN``, no ``COMMIT``. Each commit waits for its WAL
    flush as any other (measured: no slower here, the flush overlaps the next message's
    SMTP round trips), so a crash of PostgreSQL loses no recorded result. The pool
    restores the isolation level when the connection goes back.
    """
    bind = _session_factory().kw["bind"]
    if not isinstance(bind, Engine) or bind.dialect.name != "postgresql":
        yield None
        return
    with bind.connect() as connection:
        yield connection.execution_options(isolation_level="AUTOCOMMIT")


AFTER_COMMIT_KEY = "comms_after_commit"


def after_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run ``callback`` once the session's transaction has committed (never if it rolls back).

    Follow-up tasks are published this way, so a worker never picks up a task for a
    change it cannot see yet, nor one for a change that was rolled back.
    """
    session.info.setdefault(AFTER_COMMIT_KEY, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    for callback in session.info.pop(AFTER_COMMIT_KEY, []):
        callback()


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(AFTER_COMMIT_KEY, None)


def insert_rows(session: Session, model: type, rows: Sequence[dict[str, Any]]) -> None:
    """Insert many rows of ``model`` in one statement, past the ORM's objects.

    For rows nothing in the session reads back (batch rows, events); a relationship that
    holds them must be expired by the caller. No rows, no statement: an ``INSERT``
    without rows would write one row of defaults.
    """
    if rows:
        session.execute(insert(model), list(rows))
