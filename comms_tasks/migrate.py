"""Run the Alembic migrations from code: ``comms db upgrade``, the tests and the bench use this."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from comms_tasks import database_urls

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names (absolute), or None: not SQLite, in memory, a URI."""
    parsed = make_url(url)
    name = parsed.database
    if parsed.get_backend_name() != "sqlite" or not name or name == ":memory:":
        return None
    if name.startswith("file:"):
        return None
    return Path(name).resolve()


def not_there(url: str) -> str | None:
    """One line if ``url`` names a SQLite file that does not exist, else None."""

    path = sqlite_file(url)
    if path is None or path.is_file():
        return None
    where = database_urls.safe_database_url(url)
    return (
        f"no database at {path} ({where}): `comms db upgrade` creates it "
        "there, or set COMMS_DATABASE_URL (or COMMS_VAR_DIR) to where it is"
    )


def not_ready(url: str) -> str | None:
    """Why commands cannot use the database ``url`` names yet, in one line, or None.

    Never creates anything: a SQLite file that is not there is reported, not made. The
    reasons name where we looked (the URL with its password masked) and what to run.
    A schema newer than this code knows (after the code was rolled back) is used as is.
    """
    from comms_tasks.db import connection_failure, is_sqlite, make_engine
    from comms_tasks.models import SCHEMA

    missing = not_there(url)
    if missing is not None:
        return missing
    where = database_urls.safe_database_url(url)
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            schema = None if is_sqlite(url) else SCHEMA
            context = MigrationContext.configure(connection, opts={"version_table_schema": schema})
            current = set(context.get_current_heads())
    except DBAPIError as exc:
        reason = connection_failure(exc, url)
        if reason is None:
            raise
        return reason
    finally:
        engine.dispose()
    if not current:
        return f"the database at {where} is not migrated: run `comms db upgrade`"
    script = ScriptDirectory.from_config(alembic_config(url))
    heads = set(script.get_heads())
    if current == heads:
        return None
    try:
        for revision in current:
            script.get_revision(revision)
    except CommandError:
        return None
    return (
        f"the database at {where} is at revision {', '.join(sorted(current))}, "
        f"this version of comms needs {', '.join(sorted(heads))}: run `comms db upgrade`"
    )


def recreate_database(url: str) -> None:
    """Drop the PostgreSQL database ``url`` names (closing its connections) and create it
    empty, from the server's ``postgres`` database. For tests and the bench only."""
    parsed = make_url(url)
    name = parsed.database
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"database name {name!r}: letters, digits and _ only")
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
