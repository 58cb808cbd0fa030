"""Health data in dead letters: erased with the patient, redacted after the retention period.

A dead letter keeps the message as received, so that an operator can replay it once the
cause is fixed; that message may hold a patient summary, a therapist's answer or notes.
Redaction replaces every value that is not an id or vocabulary (:data:`VISIBLE_KEYS`,
in the shape of one) with :data:`REDACTED_VALUE`, in place: the dead letter stays
identifiable (task, reason, event and entity ids) but cannot be replayed any more.

- ``patient.erased`` redacts every dead letter that names the patient: its
  ``patient_id``, or one of its placement requests, anywhere in the message (also inside
  a message that arrived as a JSON string). One that arrives after the erasure is
  stored redacted.
- Retention redacts dead letters whose last activity (received, or replayed) is older
  than ``COMMS_RETENTION_DAYS``, pending or replayed.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Iterable
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    case,
    event,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from comms_tasks.contracts import too_deep
from comms_tasks.contracts.limits import MAX_ID, MAX_ID_DIGITS, MAX_STORED_NESTING
from comms_tasks.inbound import failures, masking
from comms_tasks.models import DeadLetter, Patient, PlacementRequest
from comms_tasks.models.base import utcnow

# Dead letters per transaction of the nightly purge.
DEAD_LETTERS_PER_CHUNK = 500


def redact_dead_letter(letter: DeadLetter, now: dt.datetime) -> None:
    # A message that arrived JSON-encoded keeps its ids too; one too deep to read is a
    # string, redacted whole.
    try:
        parsed = _parsed(letter.payload, 0)
    except Unexaminable:
        parsed = letter.payload
    # Stored as JSON can hold it (a NaN read from a letter stored before becomes "NaN").
    letter.payload = failures.storable(masking.redacted(parsed))
    letter.reason = masking.redacted_reason(letter.reason)
    letter.payload_redacted_at = now


class Unexaminable(ValueError):
    """A JSON string in a dead letter nested too deeply to be read safely."""


def _parsed(value: Any, depth: int) -> Any:
    """A JSON string as the document it holds (a message sent JSON-encoded), else itself.

    Read with the store's own bound: a document nested more than
    :data:`MAX_STORED_NESTING` levels deep (which the parser may not even survive)
    raises :class:`Unexaminable`; what is not JSON stays a string.
    """
    if (
        depth < masking._MAX_NESTED_JSON
        and isinstance(value, str)
        and value.lstrip()[:1] in ("{", "[")
    ):
        try:
            document = json.loads(value)
        except RecursionError:
            raise Unexaminable("a JSON string nested too deeply") from None
        except ValueError:
            return value
        if too_deep(document, MAX_STORED_NESTING) is not None:
            raise Unexaminable("a JSON string nested too deeply")
        return document
    return value


def _as_ids(value: Any) -> set[int]:
    """The ids a value spells: a number, a digit string (a wrong type), or a list of them.

    Only values a key column can hold: a hostile number must not make the query that
    looks them up fail, and with it the storing of the dead letter.
    """
    if isinstance(value, list):
        return {found for item in value if not isinstance(item, list) for found in _as_ids(item)}
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= MAX_ID_DIGITS
    ):
        number = int(value)
    return {number} if number is not None and 0 <= number <= MAX_ID else set()


def named_ids(value: Any) -> tuple[set[int], set[int]]:
    """The patient ids and placement request ids a message names, at any depth.

    Also inside a JSON string (a message sent JSON-encoded), a few levels deep; raises
    :class:`Unexaminable` for one nested too deeply to read. Walked with a stack.
    """
    patients: set[int] = set()
    requests: set[int] = set()

    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, parses = stack.pop()
        if isinstance(item, str):
            parsed = _parsed(item, parses)
            if parsed is not item:
                stack.append((parsed, parses + 1))
        elif isinstance(item, dict):
            for key, child in item.items():
                if key == "patient_id":
                    patients.update(_as_ids(child))
                elif key in ("placement_request_id", "placement_request_ids"):
                    requests.update(_as_ids(child))
                stack.append((child, parses))
        elif isinstance(item, list):
            stack.extend((child, parses) for child in item)
    return patients, requests


def names_patient(value: Any, patient_id: int, request_ids: Collection[int]) -> bool:
    """Whether the message names the patient or one of its requests, at any depth.

    A message that cannot be examined (a JSON string nested too deeply) may name anyone:
    it counts as naming the patient, so that erasure redacts it rather than fail.
    """
    try:
        patients, requests = named_ids(value)
    except Unexaminable:
        return True
    return patient_id in patients or not requests.isdisjoint(request_ids)


def _ids_as_json(ids: Iterable[int]) -> list[int | str]:
    # A wrong message may carry an id as a string: both spellings are looked for.
    return [form for value in ids for form in (value, str(value))]


def _candidates(session: Session, patient_id: int, request_ids: list[int]) -> ColumnElement[bool]:
    """Dead letters that may name the patient, found by the database; checked in Python.

    A key ``patient_id`` (or ``placement_request_id``) with the patient's (request's)
    value anywhere in the message, or a string that may hold a JSON message.
    """
    patients = _ids_as_json([patient_id])
    requests = _ids_as_json(request_ids)
    if session.get_bind().dialect.name == "postgresql":
        # Numbers and strings are compared apart: in a strict path, comparing a number
        # with a string is an error, which would make the whole filter unknown.
        variables = literal(
            {
                "patient": [patient_id],
                "patient_text": [str(patient_id)],
                "requests": list(request_ids),
                "requests_text": [str(value) for value in request_ids],
            },
            JSONB,
        )

        def names(path: str, key: str) -> ColumnElement[bool]:
            matches = (
                f'(@.type() == "number" && @ == ${key}[*])'
                f' || (@.type() == "string" && @ == ${key}_text[*])'
            )
            return func.jsonb_path_exists(
                DeadLetter.payload, f"strict {path} ? ({matches})", variables, True
            ).is_(True)

        return or_(
            names("$.**.patient_id", "patient"),
            names("$.**.placement_request_id", "requests"),
            names("$.**.placement_request_ids[*]", "requests"),
            func.jsonb_path_exists(
                DeadLetter.payload,
                'strict $.** ? (@.type() == "string" && @ starts with "{")',
                variables,
                True,
            ).is_(True),
        )
    # A letter SQLite cannot read as JSON (the token NaN, stored before it was kept as a
    # string) would make json_tree() fail the whole query: it is a candidate, as a
    # string that may hold a message, and Python (which reads NaN) decides.
    document = case(
        (func.json_valid(DeadLetter.payload) == 1, DeadLetter.payload),
        else_=literal('"{"'),
    )
    node = func.json_tree(document).table_valued("key", "atom", "type").alias("node")
    parent = func.json_tree(document).table_valued("key", "atom", "path").alias("item")
    return or_(
        select(node.c.key)
        .where(
            or_(
                and_(node.c.key == "patient_id", node.c.atom.in_(patients)),
                and_(node.c.key == "placement_request_id", node.c.atom.in_(requests)),
                and_(node.c.type == "text", node.c.atom.like("{%")),
            )
        )
        .exists(),
        select(parent.c.key)
        .where(parent.c.path.like("%.placement_request_ids"))
        .where(parent.c.atom.in_(requests))
        .exists(),
    )


def erase_patient_from_dead_letters(session: Session, patient_id: int, now: dt.datetime) -> int:
    """Redact every dead letter that names the patient; returns how many (idempotent)."""
    request_ids = list(
        session.scalars(
            select(PlacementRequest.id).where(PlacementRequest.patient_id == patient_id)
        )
    )
    letters = session.scalars(
        select(DeadLetter)
        .where(DeadLetter.payload_redacted_at.is_(None))
        .where(_candidates(session, patient_id, request_ids))
        .order_by(DeadLetter.id)
        .with_for_update()
    ).all()
    changed = 0
    for letter in letters:
        if names_patient(letter.payload, patient_id, set(request_ids)):
            _redact_whatever_it_holds(letter, now)
            changed += 1
    return changed


def _redact_whatever_it_holds(letter: DeadLetter, now: dt.datetime) -> None:
    """Redact the letter; one that cannot be walked loses its whole payload.

    One hostile letter must never make an erasure or the nightly purge fail for everyone.
    """
    try:
        redact_dead_letter(letter, now)
    except (RecursionError, ValueError, TypeError, MemoryError):
        letter.payload = masking.REDACTED_VALUE
        letter.reason = masking.redacted_reason(letter.reason)
        letter.payload_redacted_at = now


def purge_expired_dead_letters(
    session: Session, now: dt.datetime, retention_days: int, limit: int
) -> int:
    """Redact up to ``limit`` dead letters quiet for longer than the retention period."""
    cutoff = now - dt.timedelta(days=retention_days)
    letters = session.scalars(
        select(DeadLetter)
        .where(DeadLetter.payload_redacted_at.is_(None))
        .where(func.coalesce(DeadLetter.replayed_at, DeadLetter.received_at) < cutoff)
        .order_by(DeadLetter.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for letter in letters:
        _redact_whatever_it_holds(letter, now)
    return len(letters)


@event.listens_for(DeadLetter, "before_insert")
def _redact_on_insert(_mapper: Any, connection: Connection, letter: Any) -> None:
    redact_if_its_patient_was_erased(connection, letter)


def redact_if_its_patient_was_erased(connection: Connection, letter: DeadLetter) -> None:
    """A dead letter about a patient erased before it arrived is stored redacted.

    Runs before every ORM insert, and after the inbox's upsert (a Core statement, which
    no ORM hook sees).

    Erasure is final (docs/decisions.md): a late, malformed message must not bring the
    patient's data back by way of the dead letters.
    """
    try:
        patients, requests = named_ids(letter.payload)
    except (Unexaminable, RecursionError):
        # Never stand in the way of keeping a message; the next erasure (which redacts
        # a letter it cannot examine) and retention still reach it.
        return
    if not patients and not requests:
        return
    of_requests = select(PlacementRequest.patient_id).where(PlacementRequest.id.in_(requests))
    named = select(Patient.erased_at).where(
        or_(Patient.id.in_(patients), Patient.id.in_(of_requests))
    )
    if connection.dialect.name == "postgresql":
        # Share-locked, all named patients in id order (a row's erased_at is checked here,
        # not in the WHERE, which would skip it unlocked): an erasure under way (patient
        # FOR UPDATE) is waited for and its erased_at read.
        named = named.order_by(Patient.id).with_for_update(read=True)
    if any(erased_at is not None for erased_at in connection.execute(named).scalars()):
        redact_dead_letter(letter, utcnow())
