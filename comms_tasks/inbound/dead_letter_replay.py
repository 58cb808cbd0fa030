"""Replaying a dead letter: validated and applied again once its cause is fixed, or refused
with the reason it cannot be (gone, replayed, redacted, undecodable, no such task)."""

from __future__ import annotations

from comms_tasks.contracts import ContractViolation
from comms_tasks.db import transaction
from comms_tasks.inbound.failures import failure_reason, is_transient
from comms_tasks.inbound.inbox import (
    Applier,
    Outcome,
    _is_undecoded,
    _message_id_of_raw,
    _update_dead_letter,
    handle,
    unpack_arguments,
)
from comms_tasks.models import DeadLetter, DeadLetterStatus


class NotReplayable(LookupError):
    """The dead letter does not exist or was replayed already."""


def replay(dead_letter_id: int, appliers: dict[str, Applier]) -> Outcome:
    """Validate and apply a dead letter again; it stays pending, with a new reason, if it fails."""
    with transaction() as session:
        letter = session.get(DeadLetter, dead_letter_id)
        if letter is None:
            raise NotReplayable(f"dead letter {dead_letter_id} does not exist")
        if letter.status is DeadLetterStatus.REPLAYED:
            raise NotReplayable(f"dead letter {dead_letter_id} was replayed already")
        if letter.payload_redacted_at is not None:
            raise NotReplayable(
                f"dead letter {dead_letter_id}: its message was redacted on "
                f"{letter.payload_redacted_at:%Y-%m-%d} (patient erased or retention period "
                "over); nothing is left to replay"
            )
        task_name, payload = letter.task_name, letter.payload
    if task_name not in appliers:
        raise NotReplayable(
            f"dead letter {dead_letter_id}: {task_name} is no task of this service (a name "
            "the producer got wrong); nothing is replayed, the producer sends it again under "
            "the right name"
        )
    if _is_undecoded(payload):
        raise NotReplayable(
            f"dead letter {dead_letter_id}: the message could not be decoded; nothing is "
            "replayed, the producer sends it again"
        )
    raw = payload
    if isinstance(payload, dict) and set(payload) == {"args", "kwargs"}:
        # Stored whole because the call itself was malformed; unpack it the same way.
        try:
            raw = unpack_arguments(task_name, tuple(payload["args"]), payload["kwargs"])
        except ContractViolation as violation:
            outcome = Outcome("dead_letter", None, dead_letter_id, violation.reason)
            _update_dead_letter(dead_letter_id, outcome)
            return outcome
    try:
        return handle(task_name, raw, appliers[task_name], dead_letter_id=dead_letter_id)
    except Exception as exc:
        if is_transient(exc):
            raise  # the database is away: the letter stays as it is, try again later
        outcome = Outcome(
            "dead_letter",
            _message_id_of_raw(task_name, raw),
            dead_letter_id,
            failure_reason(exc),
        )
        _update_dead_letter(dead_letter_id, outcome)
        return outcome
