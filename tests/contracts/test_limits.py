"""Whatever the contract accepts fits the columns it is stored in.

A limit checked in one place and not in another loses messages: on PostgreSQL a value
longer than its column is a ``DataError``. These tests read the limits from both sides,
the contract's JSON schema and the SQLAlchemy columns, and then store the longest values
there are on real PostgreSQL, through the upsert and the weekly batch.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Connection, String
from sqlalchemy.orm import Session

from comms_tasks.contracts import MAX_MESSAGE_ID, readable_message_id, received
from comms_tasks.contracts.common import Contract
from comms_tasks.contracts.limits import MAX_SUBJECT
from comms_tasks.mail.render import EarlierEmail, EmailRenderer, PatientEntry, Recipient
from comms_tasks.models import DeadLetter, Email, EmailStatus, Therapist
from tests import factories as f
from tests.emails import test_email_pipeline as pipeline

# The contract's field -> the column it is stored in.
STORED_FIELDS: list[tuple[type[Contract], str, Any]] = [
    (received.TherapistUpsertedPayload, field, Therapist.__table__.c[field])
    for field in ("salutation", "title", "first_name", "last_name", "email", "phone")
]


def _longest(schema: dict[str, Any], definitions: dict[str, Any]) -> int | None:
    """The longest string a property's JSON schema allows, None if unbounded."""
    if "$ref" in schema:
        return _longest(definitions[schema["$ref"].rsplit("/", 1)[1]], definitions)
    if "anyOf" in schema:
        options = [option for option in schema["anyOf"] if option.get("type") != "null"]
        lengths = [_longest(option, definitions) for option in options]
        return None if None in lengths else max(length for length in lengths if length)
    if "enum" in schema:
        return max(len(value) for value in schema["enum"])
    if "const" in schema:
        return len(schema["const"])
    assert schema.get("type") == "string", schema
    return schema.get("maxLength")


def contract_max_length(model: type[Contract], field: str) -> int | None:
    schema = model.model_json_schema()
    return _longest(schema["properties"][field], schema.get("$defs", {}))


def column_length(column: Any) -> int | None:
    assert isinstance(column.type, String), column
    return column.type.length


def test_every_stored_field_is_bounded_by_the_contract_and_fits_its_column() -> None:
    for model, field, column in STORED_FIELDS:
        longest = contract_max_length(model, field)
        assert longest is not None, f"{model.__name__}.{field} is unbounded"
        width = column_length(column)
        assert width is None or longest <= width, (
            f"{model.__name__}.{field} allows {longest}, {column} holds {width}"
        )


def test_the_title_and_phone_columns_are_as_wide_as_the_names() -> None:
    # Agreement both ways for the free strings: one limit, not two that happen to fit.
    for field in ("title", "first_name", "last_name", "phone"):
        longest = contract_max_length(received.TherapistUpsertedPayload, field)
        assert column_length(Therapist.__table__.c[field]) == longest, field


def test_the_recipient_name_column_fits_the_longest_display_name() -> None:
    def longest(field: str) -> int:
        value = contract_max_length(received.TherapistUpsertedPayload, field)
        assert value is not None
        return value

    parts = ("salutation", "title", "first_name", "last_name")
    display_name = sum(longest(part) for part in parts) + len(parts) - 1
    recipient = column_length(Email.__table__.c.recipient_name)
    assert recipient is not None and display_name <= recipient
    assert column_length(Email.__table__.c.recipient_email) == longest("email")


def test_the_subject_column_fits_the_longest_subject_a_command_can_make() -> None:
    max_id = received.QueueEmail.model_json_schema()["properties"]["placement_request_ids"]
    most = max_id["maxItems"]
    biggest = max_id["items"]["maximum"]
    renderer = EmailRenderer("Therapievermittlung")
    recipient = Recipient(salutation="Frau", title=None, first_name="A", last_name="B")
    subjects = []
    for count in range(1, most + 1):
        patients = [
            PatientEntry(placement_request_id=biggest - index, position=index + 1)
            for index in range(count)
        ]
        confirmation = renderer.render("confirmation", recipient, patients).subject
        # A follow-up to that confirmation adds its "Re: ".
        follow_up = renderer.render(
            "follow_up",
            recipient,
            patients,
            earlier=EarlierEmail(subject=confirmation, sent_on=dt.date(2026, 11, 2)),
        ).subject
        subjects += [confirmation, follow_up]
    longest = max(map(len, subjects))
    width = column_length(Email.__table__.c.subject)
    assert width == MAX_SUBJECT
    assert longest <= width, (longest, width)
    # A subject a therapist can read in a mail client's list, whatever the command.
    assert longest <= 150, max(subjects, key=len)


def test_a_therapist_with_the_longest_values_is_stored_and_asked_on_postgres(
    domain_db: Connection,
) -> None:
    assert domain_db.dialect.name == "postgresql"
    longest = {
        field: contract_max_length(received.TherapistUpsertedPayload, field)
        for field in ("title", "first_name", "last_name", "phone")
    }
    values = {field: (field[0].upper() + "ä" * 300)[:length] for field, length in longest.items()}
    pipeline.apply(pipeline.THERAPIST, f.therapist_upserted(9, salutation="Frau", **values))
    pipeline.open_requests(9, range(90, 92))

    report = pipeline.run_batch(pipeline.T0)

    with Session(domain_db) as session:
        stored = session.get(Therapist, 9)
        assert stored is not None
        assert {field: getattr(stored, field) for field in values} == values
    [queued] = pipeline.all_emails(domain_db)
    assert queued.status is EmailStatus.QUEUED, report
    assert queued.recipient_name == " ".join(
        (values["title"], values["first_name"], values["last_name"])
    )


def test_a_readable_message_id_fits_the_dead_letter_column() -> None:
    assert column_length(DeadLetter.__table__.c.message_id) == MAX_MESSAGE_ID
    longest = "e" * MAX_MESSAGE_ID
    assert readable_message_id({"event_id": longest}, "event_id") == longest
    assert readable_message_id({"event_id": longest + "e"}, "event_id") is None
