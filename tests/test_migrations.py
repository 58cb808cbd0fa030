"""The Alembic migrations: up and down on both databases, and they match the models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, inspect

from comms_tasks import migrate
from comms_tasks.db import make_engine
from comms_tasks.models import SCHEMA, Base
from tests.conftest import recreate_database

EXPECTED_TABLES = {
    "therapists",
    "patients",
    "placement_requests",
    "emails",
    "email_batches",
    "phone_calls",
    "phone_call_batches",
    "outbox",
    "processed_messages",
    "dead_letters",
    "task_runs",
}


def _sqlite_metadata() -> MetaData:
    """The models as SQLite sees them: the same tables without the schema."""
    metadata = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(metadata, schema=None)
    return metadata


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'comms.db'}"


@pytest.fixture(scope="module")
def scratch_pg_url() -> str:
    return recreate_database("comms_test_migrations")


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        schema = None if url.startswith("sqlite") else SCHEMA
        return set(inspect(engine).get_table_names(schema=schema)) - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_upgrade_downgrade_upgrade(database: str, sqlite_url: str, scratch_pg_url: str) -> None:
    url = scratch_pg_url if database == "postgresql" else sqlite_url
    migrate.upgrade(url)
    assert _tables(url) == EXPECTED_TABLES
    migrate.downgrade(url, "base")
    assert _tables(url) == set()
    migrate.upgrade(url)
    assert _tables(url) == EXPECTED_TABLES


def test_postgres_keeps_everything_in_the_service_schema(scratch_pg_url: str) -> None:
    migrate.upgrade(scratch_pg_url)
    engine = make_engine(scratch_pg_url)
    try:
        inspector = inspect(engine)
        assert set(inspector.get_table_names(schema="public")) == set()
        assert "alembic_version" in inspector.get_table_names(schema=SCHEMA)
    finally:
        engine.dispose()


def _only_our_schema(name: str | None, type_: str, _parents: object) -> bool:
    if type_ == "schema":
        return name == SCHEMA
    return not (type_ == "table" and name == "alembic_version")


def test_models_match_migrations_on_postgres(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "include_schemas": True,
                    "include_name": _only_our_schema,
                    "compare_type": True,
                },
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_models_match_migrations_on_sqlite(sqlite_url: str) -> None:
    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, _sqlite_metadata()) == []
    finally:
        engine.dispose()
