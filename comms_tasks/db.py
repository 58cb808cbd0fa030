"""Engine, session factory, and one transaction per task.

PostgreSQL keeps every table in the schema ``communication_service``. SQLite has no
schemas, so on SQLite the schema name is translated away (``schema_translate_map``);
the models and migrations name the schema once and work on both.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine, create_engine, event, insert
from sqlalchemy.orm import Session, sessionmaker

from comms_tasks.models.base import SCHEMA
from comms_tasks.settings import get_settings


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def schema_translation(url: str) -> dict[str | None, str | None]:
    return {SCHEMA: None} if is_sqlite(url) else {}


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the schema mapping and per-dialect settings applied."""
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
        kwargs.setdefault("pool_size", 5)
        kwargs.setdefault("max_overflow", 5)
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


def reset_engine() -> None:
    """Forget the engine (after a fork, or when tests change the configuration)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
    get_engine.cache_clear()
    _session_factory.cache_clear()


def transaction() -> contextlib.AbstractContextManager[Session]:
    """One unit of work: commit on success, roll back on any error; the session is closed."""
    return _session_factory().begin()


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
