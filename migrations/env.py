"""Alembic environment: one set of migrations for PostgreSQL and SQLite.

The URL comes from ``config.attributes["url"]`` when called from code (``comms db
upgrade``, tests), else from the settings. On PostgreSQL everything lives in the schema
``communication_service``, created here before the version table; on SQLite the
schema is translated away and ALTERs run in batch mode (copy-and-move), since SQLite
cannot alter most things in place, with foreign keys off (the copy's drop would take
the rows that refer to the table along).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from comms_tasks.db import is_sqlite, make_engine
from comms_tasks.models import SCHEMA, Base
from comms_tasks.settings import get_settings

config = context.config


def _include_name(name: str | None, type_: str, parent_names: object) -> bool:
    if type_ == "schema":
        return name == SCHEMA
    return True


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if not sqlite:
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"'))
        connection.commit()
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table_schema=None if sqlite else SCHEMA,
        include_schemas=not sqlite,
        include_name=_include_name,
        render_as_batch=sqlite,
        compare_type=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.attributes.get("url") or get_settings().effective_database_url
    engine = make_engine(url, **({} if is_sqlite(url) else {"pool_size": 1}))
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                _run_without_foreign_keys(connection)
            else:
                _run(connection)
    finally:
        engine.dispose()


def _run_without_foreign_keys(connection: Connection) -> None:
    """SQLite: migrate with foreign keys off, then check them and turn them on again.

    Batch mode copies a table and drops the old one; with foreign keys on, the drop
    deletes (ON DELETE CASCADE) or unlinks (SET NULL) every row that refers to it, e.g.
    all ``email_batches`` when ``emails`` is altered. The pragma has no effect inside a
    transaction, so it is set on the driver's connection, which is in autocommit mode
    between transactions (``db._sqlite_on_connect``).
    """
    raw = connection.connection.driver_connection
    assert raw is not None
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        _run(connection)
        connection.commit()
        broken = raw.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"migration left {len(broken)} rows with a broken foreign key")
    finally:
        raw.execute("PRAGMA foreign_keys=ON")


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `comms db upgrade`")
run_migrations_online()
