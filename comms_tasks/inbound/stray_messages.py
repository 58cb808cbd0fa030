"""Messages the worker cannot run: kept as dead letters, never logged with their body.

Celery's consumer logs the whole body of a message for an unknown task name (a
producer's typo), of one without a task name, of one in a content type it refuses and of
one it cannot decode, and then discards it. Any of them may hold a patient summary.
:class:`DeadLetteringConsumer` (the worker's ``worker_consumer``) keeps each as a dead
letter instead: task name, message id and a reason that quotes nothing of the message;
only the letter holds the body, under retention and erasure like every other one. The
log line names the letter, the message's id and the reason.

``comms dead-letters replay`` refuses these letters with the reason (``dead_letter_replay.replay``):
an unknown name is the producer's to fix, and a body that cannot be decoded holds no
message to apply. The producer sends the message again, correctly.
"""

from __future__ import annotations

import base64
import logging
import re
from typing import Any

from celery import signals
from celery.worker.consumer.consumer import Consumer
from kombu.exceptions import ContentDisallowed
from kombu.message import Message

from comms_tasks.contracts import COMMAND_ARGUMENT, EVENT_ARGUMENT, readable_message_id
from comms_tasks.inbound import failures
from comms_tasks.inbound.inbox import (
    NOT_STORED,
    UNDECODED_BODY,
    UNDECODED_BODY_BASE64,
    loggable_id,
    store_stray,
)

log = logging.getLogger(__name__)

# What a letter names as the task of a message that names none.
NO_TASK_NAME = "[no task name]"
# A body is kept up to this many characters (a broker allows far larger messages).
MAX_KEPT_BODY_CHARS = 1_000_000
# A task name or content type a log line or reason may show as it is.
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_.:/+-]{1,100}")


def plain(value: Any) -> str:
    """``value`` if it is a plain token (a task name, a content type), else a note."""
    if isinstance(value, str) and _PLAIN_TOKEN.fullmatch(value):
        return value
    return "[not shown: not a plain name]"


def undecoded(message: Message) -> dict[str, Any]:
    """The body of a message that could not be decoded, as a letter keeps it."""
    body = message.body
    kept: dict[str, Any] = {
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
    }
    if isinstance(body, str):
        kept[UNDECODED_BODY] = body[:MAX_KEPT_BODY_CHARS]
    elif isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
        try:
            kept[UNDECODED_BODY] = raw.decode("utf-8")[:MAX_KEPT_BODY_CHARS]
        except UnicodeDecodeError:
            kept[UNDECODED_BODY_BASE64] = base64.b64encode(raw).decode()[:MAX_KEPT_BODY_CHARS]
    else:
        kept[UNDECODED_BODY] = NOT_STORED
    return kept


def call_of(message: Message) -> dict[str, Any]:
    """The message's arguments (``args``, ``kwargs``) as a dead letter of a call keeps them.

    Decoded only in an accepted content type (JSON): anything else is kept undecoded.
    """
    try:
        decoded = message.decode()
    except Exception:  # noqa: BLE001 - kept as it came
        return undecoded(message)
    if (
        isinstance(decoded, list | tuple)
        and len(decoded) == 3
        and isinstance(decoded[0], list | tuple)
        and isinstance(decoded[1], dict)
    ):
        return {"args": list(decoded[0]), "kwargs": decoded[1]}
    return {"args": [], "kwargs": {"body": decoded}}


def header(message: Message, key: str) -> Any:
    headers = message.headers
    return headers.get(key) if isinstance(headers, dict) else None


def id_of_call(call: dict[str, Any]) -> str | None:
    """The event or command id of a call's single ``event``/``command`` argument."""
    kwargs = call.get("kwargs")
    if not isinstance(kwargs, dict):
        return None
    for argument, key in ((EVENT_ARGUMENT, "event_id"), (COMMAND_ARGUMENT, "command_id")):
        found = readable_message_id(kwargs.get(argument), key)
        if found is not None:
            return found
    return None


def task_name_of(message: Message) -> str:
    name = header(message, "task")
    return name if isinstance(name, str) and name else NO_TASK_NAME


def task_id_of(message: Message) -> str | None:
    task_id = header(message, "id")
    return task_id if isinstance(task_id, str) else None


class DeadLetteringConsumer(Consumer):
    """Celery's consumer, keeping what it cannot run as dead letters instead of logs."""

    def on_close(self) -> None:
        super().on_close()
        # Imported here: the batcher builds on Celery's worker, loaded with the consumer.
        from comms_tasks.inbound.batcher import reset_batcher

        reset_batcher(self)

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        name, task_id = task_name_of(message), task_id_of(message)
        call = call_of(message)
        reason = f"unknown task: no task of this name (Celery task id {loggable_id(task_id)})"
        if self._keep(message, name, id_of_call(call) or task_id, reason, call):
            if self.event_dispatcher and task_id:
                self.event_dispatcher.send(
                    "task-failed", uuid=task_id, exception=f"NotRegistered({plain(name)!r})"
                )
            signals.task_unknown.send(sender=self, message=message, exc=exc, name=name, id=task_id)

    def on_unknown_message(self, body: Any, message: Message) -> None:
        if self._keep(message, NO_TASK_NAME, None, "the message names no task", undecoded(message)):
            signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        if isinstance(exc, ContentDisallowed):
            reason = (
                "the message's content type is not accepted: "
                f"{plain(message.content_type)} (only JSON is)"
            )
        else:
            reason = f"the message is not a valid task message: {failures.cause_of(exc)}"
        name, task_id = task_name_of(message), task_id_of(message)
        if self._keep(message, name, task_id, reason, undecoded(message)):
            signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        reason = f"the message could not be decoded: {failures.cause_of(exc)}"
        name, task_id = task_name_of(message), task_id_of(message)
        self._keep(message, name, task_id, reason, undecoded(message))

    def _keep(
        self,
        message: Message,
        task_name: str,
        message_id: str | None,
        reason: str,
        payload: Any,
    ) -> bool:
        """Store the dead letter and acknowledge the message; whether it was kept.

        While the database is away the message is left unacknowledged: the broker
        delivers it again (Redis: after the visibility timeout; AMQP: when this
        connection closes), nothing is lost.
        """
        try:
            letter_id = store_stray(task_name, message_id, reason, payload)
        except Exception as exc:  # noqa: BLE001 - an outage waits, anything else is noted
            if failures.is_transient(exc):
                log.warning(
                    "a message for %s (message %s) could not be kept as a dead letter: %s; "
                    "left unacknowledged, to be delivered again",
                    plain(task_name),
                    loggable_id(message_id),
                    failures.cause_of(exc),
                )
                return False
            reason = f"{reason}; the message could not be stored: {failures.cause_of(exc)}"
            try:
                letter_id = store_stray(task_name, message_id, reason, NOT_STORED)
            except Exception as again:  # noqa: BLE001 - the consumer must go on
                log.error(
                    "a message for %s (message %s) could not be kept as a dead letter: %s; "
                    "left unacknowledged, to be delivered again",
                    plain(task_name),
                    loggable_id(message_id),
                    failures.cause_of(again),
                )
                return False
        what = plain(task_name)
        if reason.startswith("unknown task"):
            what = f"an unknown task {what}"
        log.error(
            "dead letter %s for %s (message %s): %s",
            letter_id,
            what,
            loggable_id(message_id),
            reason,
        )
        message.ack()
        return True
