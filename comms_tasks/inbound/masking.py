"""Dead letters shown without patient data: ids and vocabulary kept, every other value
masked, reasons cut before any quoted value."""

from __future__ import annotations

import re
from typing import Any

from comms_tasks.contracts import MAX_KEY_IN_REASON, UNKNOWN_KEY

# Keys of an inbound message whose values are identifiers or vocabulary, never health
# data. A dead letter is a message in the wrong shape, so its data may sit under any key:
# everything else is masked by `comms dead-letters show` and removed by redaction.
VISIBLE_KEYS = frozenset(
    {
        "event_id",
        "event_type",
        "version",
        "occurred_at",
        "producer",
        "command_id",
        "therapist_id",
        "placement_request_id",
        "placement_request_ids",
        "patient_id",
        "email_id",
        "call_id",
        "reply_to_email_id",
        "status",
        "old_status",
        "new_status",
        "template",
        "received_at",
        "created_at",
    }
)


REDACTED_VALUE = "[redacted]"


# What a kept value of a visible key looks like: an id, a UUID, a time, an enum value.
# Anything else there (a wrong message may put a name under "therapist_id") goes.
_ID_LIKE = re.compile(r"[A-Za-z0-9_.:+-]{1,64}")


# How deep a message arriving as a JSON string inside a message is looked into.
_MAX_NESTED_JSON = 3


def redacted(value: Any, *, visible: bool = False) -> Any:
    """``value`` with every value that is not an id or vocabulary replaced by the marker.

    Walked with a stack of its own, never by recursion: a dead letter may be nested as
    deeply as the store keeps, and a JSON string inside it deeper still.
    """
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, bool]] = [(value, root, 0, visible)]
    while stack:
        item, parent, slot, shown = stack.pop()
        if isinstance(item, dict):
            copy: dict[Any, Any] = {}
            parent[slot] = copy
            for key, member in item.items():
                copy[key] = None
                stack.append((member, copy, key, key in VISIBLE_KEYS))
        elif isinstance(item, list):
            members: list[Any] = [None] * len(item)
            parent[slot] = members
            stack.extend((member, members, index, shown) for index, member in enumerate(item))
        elif item is None:
            parent[slot] = None
        elif shown and (
            isinstance(item, bool | int | float)
            or (isinstance(item, str) and _ID_LIKE.fullmatch(item))
        ):
            parent[slot] = item
        else:
            parent[slot] = REDACTED_VALUE
    return root[0]


# A field path as :func:`comms_tasks.contracts.describe` writes it: only keys that look
# like identifiers, or the marker of one that does not.
_NAMED_PATH = re.compile(
    rf"(?:event|command)(?:\.[a-z_][a-z0-9_]{{0,{MAX_KEY_IN_REASON - 1}}}"
    rf"|\.{re.escape(UNKNOWN_KEY)}|\[\d+\])*"
)


REASON_CUT = "(the rest of the reason was removed with the message)"


def redacted_reason(reason: str) -> str:
    """The reason without any key name a contract would not name (stored before it did).

    Each problem whose field path holds a key that is no identifier is cut there, with
    the rest of the reason: where such a key ends (it may hold ": " or "; ") cannot be
    told. Reasons of our own ("could not be applied: ...") stay as they are.
    """
    kept: list[str] = []
    for index, problem in enumerate(reason.split("; ")):
        path = _NAMED_PATH.match(problem)
        if path is None and index == 0:
            kept.append(problem)
            continue
        rest = problem[path.end() :] if path is not None else ""
        if rest.startswith(": ") and ": " not in rest[2:]:
            kept.append(problem)
            continue
        if path is None:
            kept.append(REASON_CUT)
            break
        named = path.group()
        if not rest.startswith("."):
            # The key began with an identifier ("hobby: HIV"): its first part goes too.
            named = re.sub(r"\.[a-z_][a-z0-9_]*$", "", named)
        kept.append(f"{named}.{UNKNOWN_KEY}: {REASON_CUT}")
        break
    return "; ".join(kept)
