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
    "inbound_mail",
    "mailbox_polls",
    "task_deliveries",
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


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_the_call_retention_migration_removes_the_free_text_missed_before(
    database: str, sqlite_url: str, scratch_pg_url: str
) -> None:
    import datetime as dt

    from sqlalchemy import Table, select

    url = scratch_pg_url if database == "postgresql" else sqlite_url
    migrate.downgrade(url, "base")
    migrate.upgrade(url, "d81f0c3a5e27")
    schema = None if database == "sqlite" else SCHEMA
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    engine = make_engine(url)

    names = ("emails", "email_batches", "patients", "placement_requests", "phone_calls")
    tables = {
        name: Table(name, MetaData(), autoload_with=engine, schema=schema)
        for name in (*names, "phone_call_batches")
    }

    def table(name: str) -> Table:
        return tables[name]

    email = {
        "therapist_id": 1,
        "template": "initial_contact",
        "recipient_email": "a@b.de",
        "recipient_name": "A",
        "sender_email": "s@b.de",
        "sender_name": "S",
        "subject": "Anfrage",
        "body_html": "<p>x</p>",
        "body_text": "x",
        "status": "sent",
        "response_content": "SECRET answer",
        "body_redacted_at": None,
        "last_activity_at": now,
        "created_at": now,
        "updated_at": now,
    }
    with engine.begin() as connection:
        connection.execute(
            table("emails").insert(),
            [
                email | {"id": 1, "dedup_key": "a", "message_id": "<a@b>", "body_redacted_at": now},
                email | {"id": 2, "dedup_key": "b", "message_id": "<b@b>"},
            ],
        )
        connection.execute(
            table("email_batches").insert(),
            [
                {
                    "id": i,
                    "email_id": i,
                    "placement_request_id": i,
                    "priority": 1,
                    "response_notes": "SECRET note",
                    "created_at": now,
                }
                for i in (1, 2)
            ],
        )
        connection.execute(
            table("patients").insert(),
            [
                {"id": 10, "summary_event_at": now, "erased_at": now, "updated_at": now},
                {"id": 20, "summary_event_at": now, "erased_at": None, "updated_at": now},
            ],
        )
        connection.execute(
            table("placement_requests").insert(),
            [
                {
                    "id": i,
                    "patient_id": i * 10,
                    "therapist_id": 1,
                    "status": "open",
                    "status_reason": "SECRET reason",
                    "created_at": now,
                    "last_event_at": now,
                    "updated_at": now,
                }
                for i in (1, 2)
            ],
        )
        connection.execute(
            table("phone_calls").insert(),
            [
                {
                    "id": i,
                    "therapist_id": 1,
                    "dedup_key": f"c{i}",
                    "scheduled_date": now.date(),
                    "scheduled_time": dt.time(9, 0),
                    "scheduled_at": now,
                    "status": "completed",
                    "notes": "SECRET call",
                    "outcome": "SECRET outcome",
                    "created_at": now,
                    "updated_at": now,
                }
                for i in (1, 2)
            ],
        )
        connection.execute(
            table("phone_call_batches").insert(),
            [
                {
                    "id": i,
                    "phone_call_id": i,
                    "placement_request_id": i,
                    "follow_up_notes": "SECRET request note",
                    "created_at": now,
                }
                for i in (1, 2)
            ],
        )
    engine.dispose()

    migrate.upgrade(url)

    engine = make_engine(url)
    tables = {name: Table(name, MetaData(), autoload_with=engine, schema=schema) for name in tables}
    with engine.connect() as connection:
        texts = {
            f"{name}.{column}": dict(
                connection.execute(select(table(name).c.id, table(name).c[column])).all()
            )
            for name, column in (
                ("emails", "response_content"),
                ("email_batches", "response_notes"),
                ("placement_requests", "status_reason"),
                ("phone_calls", "notes"),
                ("phone_calls", "outcome"),
                ("phone_call_batches", "follow_up_notes"),
            )
        } | {
            "last activity": dict(
                connection.execute(
                    select(table("phone_calls").c.id, table("phone_calls").c.last_activity_at)
                ).all()
            )
        }
    engine.dispose()
    # Redacted email 1, erased patient 10 (request 1, call 1) lose theirs; the others keep.
    for name, values in texts.items():
        if name != "last activity":
            assert values[1] is None and values[2] is not None, name

    # Up and down, no row is lost: on SQLite a copied and dropped table would take the
    # rows that refer to it along (ON DELETE CASCADE).
    def counts() -> dict[str, int]:
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                return {
                    name: len(
                        connection.execute(
                            select(
                                Table(
                                    name, MetaData(), autoload_with=connection, schema=schema
                                ).c.id
                            )
                        ).all()
                    )
                    for name in ("phone_calls", "phone_call_batches", "emails", "email_batches")
                }
        finally:
            engine.dispose()

    assert counts() == {"phone_calls": 2, "phone_call_batches": 2, "emails": 2, "email_batches": 2}
    migrate.downgrade(url, "d81f0c3a5e27")
    assert counts() == {"phone_calls": 2, "phone_call_batches": 2, "emails": 2, "email_batches": 2}
    assert set(texts["last activity"]) == {1, 2}
    assert all(value is not None for value in texts["last activity"].values())


def test_sqlite_upgrades_keep_the_rows_that_refer_to_a_copied_table(sqlite_url: str) -> None:
    """SQLite's batch mode copies a table and drops the old one; with foreign keys on,
    the drop would delete (ON DELETE CASCADE) or unlink (SET NULL) the rows referring
    to it: every email's requests, the calls' emails."""
    import datetime as dt

    from sqlalchemy import Table, select

    migrate.upgrade(sqlite_url, "9a1c3e7b5d20")
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    engine = make_engine(sqlite_url)
    tables = {
        name: Table(name, MetaData(), autoload_with=engine)
        for name in ("emails", "email_batches", "phone_calls")
    }
    with engine.begin() as connection:
        connection.execute(
            tables["emails"].insert(),
            {
                "id": 1,
                "therapist_id": 1,
                "template": "initial_contact",
                "dedup_key": "a",
                "recipient_email": "a@b.de",
                "recipient_name": "A",
                "sender_email": "s@b.de",
                "sender_name": "S",
                "subject": "Anfrage",
                "body_html": "<p>x</p>",
                "body_text": "x",
                "message_id": "<a@b>",
                "status": "sent",
                "created_at": now,
                "updated_at": now,
            },
        )
        connection.execute(
            tables["email_batches"].insert(),
            {"id": 1, "email_id": 1, "placement_request_id": 1, "priority": 1, "created_at": now},
        )
        connection.execute(
            tables["phone_calls"].insert(),
            {
                "id": 1,
                "therapist_id": 1,
                "email_id": 1,
                "dedup_key": "c",
                "scheduled_date": now.date(),
                "scheduled_time": dt.time(9, 0),
                "scheduled_at": now,
                "status": "scheduled",
                "created_at": now,
                "updated_at": now,
            },
        )
    engine.dispose()

    migrate.upgrade(sqlite_url)

    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            batches = Table("email_batches", MetaData(), autoload_with=connection)
            calls = Table("phone_calls", MetaData(), autoload_with=connection)
            assert connection.execute(select(batches.c.email_id)).scalars().all() == [1]
            assert connection.execute(select(calls.c.email_id)).scalars().all() == [1]
            foreign_keys = connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
            assert foreign_keys == 1
    finally:
        engine.dispose()
