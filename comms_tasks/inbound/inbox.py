"""The inbound side: every message is validated, applied once, or kept as a dead letter.

:func:`handle` is what every inbound task does: validate the raw message against its
contract; if it fails, store a dead letter (not retried, the worker goes on); else apply
it in one transaction together with a row in ``processed_messages``, so the same
``event_id``/``command_id`` is never applied twice, even by two workers at once.

A message that cannot be applied is never dropped either: an outage of the database
(:func:`is_transient`) is retried by the task, and anything else, or an outage that
outlives the retries, is stored as a dead letter by :func:`store_failure`, with the
exception's class as its reason, to be replayed with ``comms dead-letters replay``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from comms_tasks.contracts import (
    COMMAND_ARGUMENT,
    COMMANDS,
    EVENT_ARGUMENT,
    INBOUND_EVENTS,
    ContractViolation,
    readable_message_id,
    validate_command,
    validate_event,
)
from comms_tasks.contracts.common import Contract
from comms_tasks.db import transaction
from comms_tasks.inbound import failures
from comms_tasks.models import DeadLetter, DeadLetterStatus, ProcessedMessage
from comms_tasks.models.base import utcnow
from comms_tasks.models.messaging import PENDING_UNREDACTED
from comms_tasks.task_starts import forget_on_commit

log = logging.getLogger(__name__)
# What the dead letters' task_name column holds.
MAX_TASK_NAME = 100


Applier = Callable[[Session, Any], None]


@dataclasses.dataclass(frozen=True)
class Outcome:
    result: str  # "applied", "duplicate" or "dead_letter"
    message_id: str | None
    dead_letter_id: int | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def argument_name(task_name: str) -> str:
    return EVENT_ARGUMENT if task_name in INBOUND_EVENTS else COMMAND_ARGUMENT


def validate(task_name: str, raw: Any) -> Contract:
    if task_name in INBOUND_EVENTS:
        return validate_event(task_name, raw)
    if task_name in COMMANDS:
        return validate_command(task_name, raw)
    raise KeyError(task_name)


def message_id_of(message: Contract) -> str:
    value = getattr(message, "event_id", None) or getattr(message, "command_id", None)
    return str(value)


def unpack_arguments(task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The message from the task's arguments: exactly one keyword argument, by contract."""
    name = argument_name(task_name)
    if args or set(kwargs) != {name}:
        raise ContractViolation(f"arguments: expected exactly one keyword argument {name!r}", None)
    return kwargs[name]


def _message_id_of_raw(task_name: str, raw: Any) -> str | None:
    return readable_message_id(raw, "event_id" if task_name in INBOUND_EVENTS else "command_id")


def store_failure(
    task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any], reason: str
) -> Outcome:
    """Keep a message whose application failed for good as a dead letter, for replay."""
    return _keep_call(task_name, args, kwargs, reason)


def store_unstorable(
    task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any], exc: BaseException
) -> Outcome:
    """Keep a message whose dead letter itself cannot be written, as a minimal letter.

    Its task, message id and the cause, no payload (a note in its place): the message is
    not lost without a trace, and the producer can send it again once fixed. Redelivered,
    it counts on the same letter (fingerprint of the message as received).
    """
    reason = f"the message could not be stored: {failures.cause_of(exc)}"
    return _keep_call(task_name, args, kwargs, reason, unstorable=True)


def _keep_call(
    task_name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    reason: str,
    *,
    unstorable: bool = False,
) -> Outcome:
    try:
        raw = unpack_arguments(task_name, args, kwargs)
    except ContractViolation:
        raw = {"args": list(args), "kwargs": kwargs}
    try:
        message_id = _message_id_of_raw(task_name, raw)
    except Exception:  # noqa: BLE001 - whatever the message holds, the letter is kept
        message_id = None
    letter_id = _store_dead_letter(
        task_name, ContractViolation(reason, message_id), raw, unstorable=unstorable
    )
    _log_dead_letter(logging.ERROR, letter_id, task_name, message_id, reason)
    return Outcome("dead_letter", message_id, letter_id, reason)


def _log_dead_letter(
    level: int, letter_id: int, task_name: str, message_id: str | None, reason: str
) -> None:
    log.log(
        level,
        "dead letter %s for %s (message %s): %s",
        letter_id,
        task_name,
        loggable_id(message_id),
        reason,
    )


def loggable_id(message_id: str | None) -> str:
    """A message id as a log line may show it: a stranger's id that is not a UUID is not.

    The dead letter keeps it whole; a log line must not carry whatever a producer put
    in the field (names, for one).
    """
    if message_id is None:
        return "none"
    try:
        return str(uuid.UUID(message_id))
    except ValueError:
        return "not a UUID"


def fingerprint(task_name: str, payload: Any) -> str:
    """SHA-256 (hex) of the task and its stored message as canonical JSON.

    Keys sorted, no white space: the same JSON object however its keys were ordered.
    """
    try:
        text = json.dumps([task_name, payload], sort_keys=True, separators=(",", ":"), default=repr)
    except TypeError:  # keys of mixed types cannot be sorted: their order as given
        text = json.dumps([task_name, payload], separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


# What a minimal letter (:func:`store_unstorable`) keeps in place of the message.
NOT_STORED = "[the message could not be stored]"
# Where a letter keeps the body of a message that could not be decoded
# (:mod:`comms_tasks.inbound.stray_messages`): as text, or as base64 when it is not UTF-8.
UNDECODED_BODY = "undecoded_body"
UNDECODED_BODY_BASE64 = "undecoded_body_base64"


def store_stray(task_name: str, message_id: str | None, reason: str, payload: Any) -> int:
    """Keep a message the worker cannot run (unknown task, undecodable) as a dead letter.

    ``task_name`` is the producer's, cut to what the column holds; redelivered, the
    message counts on the same letter.
    """
    return _store_dead_letter(
        task_name[:MAX_TASK_NAME], ContractViolation(reason, message_id), payload
    )


def _is_undecoded(payload: Any) -> bool:
    return isinstance(payload, dict) and bool(
        {UNDECODED_BODY, UNDECODED_BODY_BASE64} & set(payload)
    )


def _store_dead_letter(
    task_name: str, violation: ContractViolation, raw: Any, *, unstorable: bool = False
) -> int:
    """Store a pending dead letter, or count one more delivery on the one already there.

    The same message (same task, same payload) arriving again while its letter is
    pending, redelivered or sent twice, by one worker or two at once, stays one letter:
    the insert is an upsert on the unique index of pending fingerprints. Its reason and
    ``received_at`` (its retention clock) are the newest delivery's. A letter already
    redacted (erasure, retention) is left alone: the delivery is a new letter, which
    can be replayed (or is stored redacted if its patient was erased).
    """
    if unstorable:
        payload: Any = NOT_STORED
        try:
            key = fingerprint(task_name, [NOT_STORED, raw])
        except Exception:  # noqa: BLE001 - not even hashable as JSON: a letter of its own
            key = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    else:
        payload = failures.storable(raw)
        key = fingerprint(task_name, payload)
    values = {
        "task_name": task_name,
        "message_id": failures.storable(violation.message_id),
        "reason": failures.storable(violation.reason),
        "payload": payload,
        "status": DeadLetterStatus.PENDING,
        "received_at": utcnow(),
        "fingerprint": key,
        "deliveries": 1,
    }
    with transaction() as session:
        dialect = session.get_bind().dialect.name
        insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
        statement = insert(DeadLetter).values(values)
        statement = statement.on_conflict_do_update(
            index_elements=[DeadLetter.task_name, DeadLetter.fingerprint],
            index_where=text(PENDING_UNREDACTED),
            set_={
                "deliveries": DeadLetter.deliveries + 1,
                "reason": statement.excluded.reason,
                # The retention clock is the last delivery's.
                "received_at": statement.excluded.received_at,
            },
        )
        letter_id: int = session.execute(statement.returning(DeadLetter.id)).scalar_one()
        # Imported here: dead_letters builds on this module.
        from comms_tasks.inbound.dead_letters import redact_if_its_patient_was_erased

        letter = session.get(DeadLetter, letter_id)
        if letter is not None and letter.payload_redacted_at is None:
            redact_if_its_patient_was_erased(session.connection(), letter)
        return letter_id


def _update_dead_letter(dead_letter_id: int, outcome: Outcome) -> None:
    with transaction() as session:
        letter = session.get(DeadLetter, dead_letter_id, with_for_update=True)
        if letter is None:
            return
        letter.replay_count += 1
        if outcome.result == "dead_letter":
            letter.reason = failures.storable(outcome.reason) or letter.reason
        else:
            letter.status = DeadLetterStatus.REPLAYED
            letter.replayed_at = utcnow()


def _already_processed(message_id: str) -> bool:
    with transaction() as session:
        return (
            session.scalar(
                select(ProcessedMessage.message_id).where(ProcessedMessage.message_id == message_id)
            )
            is not None
        )


def claim(session: Session, message_id: str, task_name: str) -> bool:
    """Insert the message's ``processed_messages`` row; False if it is there already."""
    return message_id in claim_all(session, [(message_id, task_name)])


def claim_all(session: Session, messages: list[tuple[str, str]]) -> set[str]:
    """Insert the ``processed_messages`` rows of several messages (id, task name) in one
    statement; the ids that were not there yet. A message id twice is claimed once."""
    if not messages:
        return set()
    dialect = session.get_bind().dialect.name
    insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
    now = utcnow()
    rows = [
        {"message_id": message_id, "task_name": task_name, "processed_at": now}
        for message_id, task_name in messages
    ]
    statement = (
        insert(ProcessedMessage)
        .values(rows)
        .on_conflict_do_nothing(index_elements=[ProcessedMessage.message_id])
        .returning(ProcessedMessage.message_id)
    )
    return set(session.scalars(statement))


def _apply_once(task_name: str, message: Contract, apply: Applier) -> Outcome:
    message_id = message_id_of(message)
    try:
        with transaction() as session:
            # The run's delivery count goes with this transaction, applied or duplicate.
            forget_on_commit(session)
            # Written first, in one statement that also tells a message applied before: a
            # concurrent worker applying the same message waits on this key, then finds
            # it taken (or, had the first rolled back, takes it), so only one applies.
            if not claim(session, message_id, task_name):
                return Outcome("duplicate", message_id)
            apply(session, message)
    except IntegrityError:
        if _already_processed(message_id):
            return Outcome("duplicate", message_id)
        raise
    except ContractViolation as violation:
        # An applier need not know the message's id: every dead letter of a well-formed
        # message carries it, for the log, the operator and the replay.
        if violation.message_id is None:
            violation.message_id = message_id
        raise
    return Outcome("applied", message_id)


def handle_call(
    task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any], apply: Applier
) -> Outcome:
    """What an inbound task does with the arguments it was called with."""
    try:
        raw = unpack_arguments(task_name, args, kwargs)
    except ContractViolation as violation:
        raw = {"args": list(args), "kwargs": kwargs}
        letter_id = _store_dead_letter(task_name, violation, raw)
        log.warning("dead letter %s for %s: %s", letter_id, task_name, violation.reason)
        return Outcome("dead_letter", None, letter_id, violation.reason)
    return handle(task_name, raw, apply)


def handle(
    task_name: str,
    raw: Any,
    apply: Applier,
    *,
    dead_letter_id: int | None = None,
) -> Outcome:
    """Validate and apply one inbound message; see the module docstring."""
    try:
        message = validate(task_name, raw)
        outcome = _apply_once(task_name, message, apply)
    except ContractViolation as violation:
        outcome = Outcome("dead_letter", violation.message_id, reason=violation.reason)
        if dead_letter_id is None:
            dead_letter_id = _store_dead_letter(task_name, violation, raw)
            outcome = dataclasses.replace(outcome, dead_letter_id=dead_letter_id)
            _log_dead_letter(
                logging.WARNING, dead_letter_id, task_name, violation.message_id, violation.reason
            )
            return outcome
    if dead_letter_id is not None:
        _update_dead_letter(dead_letter_id, outcome)
        outcome = dataclasses.replace(outcome, dead_letter_id=dead_letter_id)
    return outcome
