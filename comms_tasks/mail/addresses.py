"""Plain ASCII addresses: what a therapist's address, a reply or bounce address may be."""

from __future__ import annotations

import re

# RFC 5321: at most 254 characters in a forward path.
MAX_ADDRESS = 254


# A plain ASCII address: what the contract lets a therapist's address be.
_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)


_PLAIN_ADDRESS = re.compile(rf"\A{_ADDRESS.pattern}\Z")


def plain_address(value: str) -> str | None:
    """``value`` lowercased when it is one plain ASCII address, else None."""
    candidate = value.strip().strip("<>").strip()
    if len(candidate) <= MAX_ADDRESS and _PLAIN_ADDRESS.match(candidate):
        return candidate.lower()
    return None
