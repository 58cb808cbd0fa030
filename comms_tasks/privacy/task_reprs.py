"""What the worker may show of a message: ids, never patient data.

Inbound messages carry patient summaries in their arguments, and Celery reports a
task's arguments in its events (which Flower shows) and in some log lines. A sender
fills ``argsrepr``/``kwargsrepr`` itself, usually with the whole payload; the worker
replaces them with the message's ids before anything is reported.

Whatever this app publishes itself (a retry, which Celery republishes with reprs rebuilt
from the arguments; ``comms``) carries ids-only reprs too, in the message's headers and
its ``task-sent`` event: :class:`IdsOnlyAMQP` builds every inbound task's message.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP
from celery.worker.request import Request

from comms_tasks.contracts import COMMANDS, INBOUND_EVENTS

# The keys of a message that identify it and carry no personal data.
IDENTIFYING_KEYS = ("event_id", "event_type", "command_id")
# The tasks whose arguments may carry patient data: the inbound messages.
INBOUND_TASK_NAMES = frozenset({*INBOUND_EVENTS, *COMMANDS})


def identifying_repr(args: Any, kwargs: Any) -> tuple[str, str]:
    """A safe stand-in for the arguments: the ids of each JSON object passed."""

    def ids(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: value[key] for key in IDENTIFYING_KEYS if isinstance(value.get(key), str)}
        return type(value).__name__

    safe_args = [ids(value) for value in args] if isinstance(args, list | tuple) else []
    safe_kwargs = (
        {str(key): ids(value) for key, value in kwargs.items()} if isinstance(kwargs, dict) else {}
    )
    return repr(safe_args), repr(safe_kwargs)


class RedactedRequest(Request):
    """A task request whose reported arguments are ids only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._argsrepr, self._kwargsrepr = identifying_repr(self._args, self._kwargs)
        self._request_dict["argsrepr"] = self._argsrepr
        self._request_dict["kwargsrepr"] = self._kwargsrepr


class IdsOnlyAMQP(AMQP):
    """Builds task messages; an inbound task's always shows its ids only.

    Whoever publishes it here (a retry, ``comms``, a replay through the broker) and
    whatever reprs they pass: the reprs are rebuilt from the arguments' ids, for the
    message's headers and for its ``task-sent`` event alike.
    """

    def as_task_v2(
        self,
        task_id: str,
        name: str,
        args: Any = None,
        kwargs: Any = None,
        *rest: Any,
        **options: Any,
    ) -> Any:
        if name in INBOUND_TASK_NAMES:
            options["argsrepr"], options["kwargsrepr"] = identifying_repr(args or (), kwargs or {})
        return super().as_task_v2(task_id, name, args, kwargs, *rest, **options)
