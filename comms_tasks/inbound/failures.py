"""What a failure is: transient (the database away, a lost race) or not, its one-line
reason, and what of a message can be stored."""

from __future__ import annotations

import math
import re
from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from comms_tasks.contracts.limits import MAX_STORED_NESTING


def cause_of(exc: BaseException) -> str:
    name = type(exc).__name__
    orig = getattr(exc, "orig", None)
    if orig is not None:
        name = f"{name} ({type(orig).__name__})"
    return name


# NUL and lone surrogates (a "\ud800" escape in JSON is no character): PostgreSQL can
# store neither in text or JSON.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


# What a dead letter keeps in place of containers nested deeper than it can store.
TOO_DEEP = f"[nested too deeply: more than {MAX_STORED_NESTING} levels, not kept]"


def storable(value: Any) -> Any:
    """``value`` with every NUL and lone surrogate replaced, so that PostgreSQL stores it.

    A dead letter must be kept whatever it holds; U+FFFD marks where such a character was.
    NaN and the infinities (Python reads the tokens ``NaN``/``Infinity`` and a number
    like ``1e400`` as such floats) become the strings "NaN", "Infinity", "-Infinity":
    JSON has no such numbers, PostgreSQL refuses them and SQLite's JSON functions fail
    on them.
    Containers more than :data:`MAX_STORED_NESTING` levels deep are replaced by
    :data:`TOO_DEEP`: JSON encoders (and PostgreSQL) refuse what is nested deeper than
    their limits. Walked with a stack of its own, never by recursion.
    """
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, int]] = [(value, root, 0, 1)]
    while stack:
        item, parent, slot, depth = stack.pop()
        if isinstance(item, str):
            parent[slot] = _UNSTORABLE.sub("\ufffd", item)
        elif isinstance(item, dict | list | tuple) and depth > MAX_STORED_NESTING:
            parent[slot] = TOO_DEEP
        elif isinstance(item, dict):
            copy: dict[Any, Any] = {}
            parent[slot] = copy
            for key, member in item.items():
                if isinstance(key, str):
                    key = _UNSTORABLE.sub("\ufffd", key)
                copy[key] = None
                stack.append((member, copy, key, depth + 1))
        elif isinstance(item, list | tuple):
            members: list[Any] = [None] * len(item)
            parent[slot] = members
            stack.extend((member, members, index, depth + 1) for index, member in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            parent[slot] = "NaN" if math.isnan(item) else ("Infinity" if item > 0 else "-Infinity")
        else:
            parent[slot] = item
    return root[0]


# SQLSTATEs of an outage: serialization failure, deadlock, lock not available, the server
# shutting down or starting, too many connections. Class 08 (connection exception) too.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"})


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error (psycopg 2 and 3), if the server sent one."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage that a later attempt may not meet.

    A lost or refused connection (the connection was invalidated, or the driver raised
    an ``OperationalError``/``InterfaceError`` without a SQLSTATE from the server), a
    serialization failure or deadlock, a lock timeout, a server shutting down. Nothing
    else: a ``DataError``, an ``IntegrityError`` or an ``OverflowError`` fails the same
    way every time.
    """
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    code = sqlstate_of(exc)
    if code is not None:
        return code in TRANSIENT_SQLSTATES or code.startswith("08")
    return isinstance(exc, OperationalError | InterfaceError)


def failure_reason(exc: BaseException, retries: int = 0) -> str:
    """A dead letter's reason for an exception: its class (and the driver's), no values."""
    name = cause_of(exc)
    if retries:
        return f"could not be applied after {retries} retries: {name}"
    return f"could not be applied: {name}"
