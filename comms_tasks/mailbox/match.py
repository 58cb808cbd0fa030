"""The pure part of matching a message to the email it answers: tokens and match keys.

Every email we send gets a token of its own (:func:`new_token`), written into its reply
address with plus addressing (:func:`tagged_address`) and, where configured, into its
VERP envelope sender. :func:`keys` reads what a message offers for matching, strongest
first: tokens in its recipient headers (for a bounce also in the returned original), our
Message-IDs in its thread headers (for a bounce the returned Message-ID), and its sender.
Looking those up is the database's part.

Header values are a stranger's: a token counts only with the exact alphabet and length
:func:`new_token` makes, in the exact base address configured; a Message-ID only with
the ``<local@domain>`` shape and at most 300 characters.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message

from comms_tasks.mail import tokens as reply_tokens
from comms_tasks.mail.addresses import plain_address
from comms_tasks.mailbox import _mime
from comms_tasks.mailbox.classify import Classified, MailKind

__all__ = ["MatchKeys", "keys"]

# Headers that name the mailbox a message was delivered to, in order of trust.
RECIPIENT_HEADERS = ("Delivered-To", "X-Original-To", "To", "Cc")
# Headers of a returned original that carry our tagged addresses.
RETURNED_ADDRESS_HEADERS = ("Reply-To", "Return-Path", "Sender")
MAX_TOKENS = 10
MAX_MESSAGE_IDS = 20
# The From value looked at for the sender; a real one is far shorter.
MAX_FROM_CHARS = 1000


@dataclass(frozen=True)
class MatchKeys:
    tokens: tuple[str, ...] = ()
    message_ids: tuple[str, ...] = ()
    sender: str | None = None


def keys(
    raw_or_message: bytes | Message,
    classified: Classified,
    *,
    reply_address: str | None,
    bounce_address: str | None,
) -> MatchKeys:
    """What ``raw_or_message`` offers for matching; empty keys when nothing is readable."""
    try:
        message = _message(raw_or_message)
        if message is None:
            return MatchKeys()
        return _keys(message, classified, reply_address, bounce_address)
    except Exception:  # noqa: BLE001 - a stranger's message never stops a poll
        return MatchKeys()


def _message(raw_or_message: bytes | Message) -> Message | None:
    if isinstance(raw_or_message, Message):
        return raw_or_message
    return _mime.parse(raw_or_message) or _mime.parse_headers(raw_or_message)


def _keys(
    message: Message,
    classified: Classified,
    reply_address: str | None,
    bounce_address: str | None,
) -> MatchKeys:
    is_bounce = classified.kind in {MailKind.BOUNCE, MailKind.DELAYED}
    bases = [_base(reply_address)]
    if is_bounce:
        bases.append(_base(bounce_address))
    valid_bases = [base for base in bases if base is not None]
    tokens: list[str] = []
    for name in RECIPIENT_HEADERS:
        for value in _mime.header_values(message, name):
            tokens.extend(_tokens_in(value, valid_bases))
    if is_bounce:
        for returned in _returned_headers(message):
            for name in RETURNED_ADDRESS_HEADERS:
                for value in _mime.header_values(returned, name):
                    tokens.extend(_tokens_in(value, valid_bases))

    ids: list[str] = []
    for value in _mime.header_values(message, "In-Reply-To"):
        ids.extend(_mime.message_ids_in(value))
    for value in reversed(_mime.header_values(message, "References")):
        ids.extend(reversed(_mime.message_ids_in(value)))
    if is_bounce:
        ids.extend(i for i in classified.returned_message_ids if _mime.is_message_id(i))

    return MatchKeys(
        tokens=_unique(tokens, MAX_TOKENS),
        message_ids=_unique(ids, MAX_MESSAGE_IDS),
        sender=_sender(message),
    )


def _base(address: str | None) -> tuple[str, str] | None:
    """The configured address as (local part, domain), lowercased; None if unusable."""
    plain = plain_address(address) if isinstance(address, str) else None
    if plain is None:
        return None
    local, _, domain = plain.rpartition("@")
    return (local, domain) if "+" not in local else None


def _tokens_in(value: str, bases: list[tuple[str, str]]) -> Iterable[str]:
    for address in _mime.addresses_in(value):
        local, _, domain = address.lower().rpartition("@")
        base_local, plus, token = local.partition("+")
        if plus and reply_tokens.is_token(token) and (base_local, domain) in bases:
            yield token


def _returned_headers(message: Message) -> list[Message]:
    """The header blocks of the returned original inside a bounce."""
    found: list[Message] = []
    for part in _mime.walk(message):
        kind = _mime.content_type(part)
        if kind == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                found.append(payload[0])
        elif kind == "text/rfc822-headers" or (kind == "text/plain" and part is not message):
            text, _ = _mime.part_text(part)
            found.append(_header_lines(text))
    if _mime.content_type(message) == "text/plain":
        text, _ = _mime.part_text(message)
        found.append(_header_lines(text))
    return found


_HEADER_LINE = re.compile(
    r"^[ \t]*(Reply-To|Return-Path|Sender):[ \t]*([^\r\n]{0,1000})$", re.IGNORECASE | re.MULTILINE
)


def _header_lines(text: str) -> Message:
    """Header-like lines of a text (a returned original pasted into a bounce) as headers."""
    block = Message()
    for name, value in _HEADER_LINE.findall(text[: _mime.MAX_BODY_CHARS]):
        block[name] = value
    return block


def _sender(message: Message) -> str | None:
    values = _mime.header_values(message, "From")
    if len(values) != 1:
        return None
    try:
        parsed = email.utils.getaddresses([values[0][:MAX_FROM_CHARS]])
    except Exception:  # noqa: BLE001
        return None
    addresses = [address for _, address in parsed if address]
    if len(addresses) != 1:
        return None
    return plain_address(addresses[0])


def _unique(values: Iterable[str], limit: int) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for value in values:
        seen.setdefault(value, None)
        if len(seen) >= limit:
            break
    return tuple(seen)
