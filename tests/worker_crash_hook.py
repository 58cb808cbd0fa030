"""Test only: makes a worker's pool process die on one chosen inbound message.

Loaded into a real worker with ``--include tests.worker_crash_hook`` (never by the
service). It simulates what no test can cause on demand: a message whose handling kills
the process running it (out of memory, a segfault in a C extension). The inbound task
runs as always; where it would apply the message, alone or in a batch of the worker's
(``comms_tasks.inbound.batch``), a therapist event whose last name is :data:`CRASH_NAME`
ends the process with ``os._exit`` instead, after noting the process id in the file
named by ``CRASH_HOOK_LOG``.
"""

from __future__ import annotations

import os
from typing import Any

from comms_tasks.inbound import batch, runner

CRASH_NAME = "Absturz-Testfall"
_handle_call = runner.handle_call


_apply_batch = batch.apply_batch


def _crash_on(kwargs: dict[str, Any]) -> None:
    event = kwargs.get("event")
    payload = event.get("payload") if isinstance(event, dict) else None
    if isinstance(payload, dict) and payload.get("last_name") == CRASH_NAME:
        with open(os.environ["CRASH_HOOK_LOG"], "a", encoding="utf-8") as crashes:
            crashes.write(f"{os.getpid()}\n")
        os._exit(1)


def _crashing_handle_call(
    task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any], apply: Any
) -> Any:
    _crash_on(kwargs)
    return _handle_call(task_name, args, kwargs, apply)


def _crashing_apply_batch(messages: batch.Batch) -> Any:
    for _, _, _, kwargs in messages.items:
        _crash_on(kwargs)
    return _apply_batch(messages)


runner.handle_call = _crashing_handle_call
batch.apply_batch = _crashing_apply_batch
