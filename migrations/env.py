"""Alembic environment: one set of migrations for PostgreSQL and SQLite.

The URL comes from ``config.attributes["url"]`` when called from code (``comms db
upgrade``, tests), else from the settings. On PostgreSQL everything lives in the schema
``communication_service``, created here before the version table; on SQLite the
schema is translated away and ALTERs run in batch mode (copy-and-move), since SQLite
cannot alter most things in place.
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
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `comms db upgrade`")
run_migrations_online()
