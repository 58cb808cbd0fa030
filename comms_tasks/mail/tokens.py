"""Each email's reply token: random, unguessable, in its reply and bounce addresses
(``antwort+<token>@...``). No database."""

from __future__ import annotations

import base64
import re
import secrets

from comms_tasks.contracts.limits import REPLY_TOKEN_LENGTH
from comms_tasks.mail.addresses import MAX_ADDRESS, plain_address

# 128 random bits: lowercase base32 without padding, 26 characters. Lowercase survives
# servers that lowercase local parts; base32 has no character that needs quoting.
TOKEN_BYTES = 16


TOKEN_LENGTH = REPLY_TOKEN_LENGTH


_TOKEN = re.compile(rf"\A[a-z2-7]{{{TOKEN_LENGTH}}}\Z")


def new_token() -> str:
    """A fresh random token, safe in an email local part."""
    return base64.b32encode(secrets.token_bytes(TOKEN_BYTES)).decode("ascii").rstrip("=").lower()


def is_token(value: str) -> bool:
    return isinstance(value, str) and _TOKEN.match(value) is not None


def tagged_address(base: str, token: str) -> str:
    """``antwort@example.org`` and a token → ``antwort+<token>@example.org``."""
    address = plain_address(base) if isinstance(base, str) else None
    if address is None or base.strip() != base or base.startswith("<"):
        raise ValueError("the reply or bounce address must be a plain address local@domain")
    local, _, domain = base.rpartition("@")
    if "+" in local:
        raise ValueError("the reply or bounce address must not contain '+' already")
    if not is_token(token):
        raise ValueError("not a token made by new_token()")
    tagged = f"{local}+{token}@{domain}"
    if len(tagged) > MAX_ADDRESS:
        raise ValueError("the tagged address would be longer than 254 characters")
    return tagged
