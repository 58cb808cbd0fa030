"""Declarative base, the schema name, and the column types every table shares."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Integer,
    MetaData,
    TypeDecorator,
    event,
    inspect,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase

SCHEMA = "communication_service"

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA, naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A point in time, stored in UTC and always read back time-zone aware.

    SQLite keeps no offset, so values are normalised to UTC on the way in and tagged
    as UTC on the way out; naive datetimes are refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: store times with an offset")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def value_enum(enum_class: type[enum.Enum], name: str) -> Enum:
    """Store an enum by its lower-case value, as a checked string on both databases."""
    return Enum(
        enum_class,
        name=name,
        values_callable=lambda members: [member.value for member in members],
        native_enum=False,
        create_constraint=True,
        validate_strings=True,
        length=max(len(member.value) for member in enum_class),
    )


# Surrogate keys: BIGINT on PostgreSQL; SQLite only auto-increments an INTEGER key.
BigID = BigInteger().with_variant(Integer, "sqlite")

# JSON documents: JSONB on PostgreSQL, JSON text on SQLite.
JSONDocument = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def track_activity(model: type[Any], fields: tuple[str, ...]) -> None:
    """Move ``model.last_activity_at`` (the retention clock) when one of ``fields`` changes.

    Housekeeping writes to other columns move ``updated_at`` only; bulk ``UPDATE``
    statements bypass the hook (only housekeeping uses them).
    """

    @event.listens_for(model, "before_update")
    def _note_activity(_mapper: Any, _connection: Any, row: Any) -> None:
        state = inspect(row)
        if any(state.attrs[name].history.has_changes() for name in fields):
            row.last_activity_at = utcnow()
