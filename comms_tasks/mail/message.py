"""One outgoing email as plain values, and its MIME form.

:func:`build_mime` is the only place where header values meet the wire format, so it is
also where header injection is refused: every value that ends up in a header must be a
single line, or the message is not built at all. That is checked twice: on the values
given (no control or line-separator character, no RFC 2047 encoded word, which the email
package would decode and write back with whatever line break it holds, CVE-2024-6923),
and on every header as written (one line, or folded lines that each start with white
space, whose encoded words decode to no line break), whatever the Python version.
"""

from __future__ import annotations

import binascii
import dataclasses
import datetime
import email.errors
import email.header
import email.policy
import email.utils
import functools
import re
import unicodedata
import uuid
from email.headerregistry import Address

# CRLF on the wire; non-ASCII header text as RFC 2047 encoded words.
MIME_POLICY = email.policy.SMTP
# Quoted-printable keeps every line short and 7-bit, so no relay needs 8BITMIME, and
# the .eml files of the file backend stay readable.
BODY_TRANSFER_ENCODING = "quoted-printable"

_MESSAGE_ID = re.compile(r"<[^<>\s@]+@[^<>\s@]+>")
_LINE_END = re.compile(r"\r\n?")
# An RFC 2047 encoded word, or anything a lenient decoder might take for one.
_ENCODED_WORD = re.compile(r"=\?.*\?=", re.DOTALL)
_UNSAFE_CATEGORIES = ("Cc", "Zl", "Zp")


class HeaderError(ValueError):
    """A header value that cannot be written as one header: the message is not built.

    A :class:`ValueError`, so the sender treats it as a permanent failure of that email.
    """


@dataclasses.dataclass(frozen=True)
class OutgoingMessage:
    email_id: int
    message_id: str  # "<...@domain>", fixed before the first attempt
    sender_email: str
    sender_name: str
    recipient_email: str
    recipient_name: str
    reply_to: str | None
    subject: str
    body_text: str
    body_html: str
    date: datetime.datetime  # aware
    in_reply_to: str | None = None  # Message-ID of the original, for follow-ups
    references: tuple[str, ...] = ()


def new_message_id(sender_email: str) -> str:
    """A globally unique Message-ID in the sender's domain: ``<{uuid4 hex}@{domain}>``."""
    _, at, domain = sender_email.rpartition("@")
    if not at or not domain:
        raise ValueError(f"sender_email {sender_email!r} has no domain")
    _refuse_line_breaks("sender_email", domain)
    return f"<{uuid.uuid4().hex}@{ascii_address(sender_email).rpartition('@')[2]}>"


def ascii_address(address: str) -> str:
    """The address with an internationalised domain in its ASCII (IDNA) form.

    Headers and the SMTP envelope then need no SMTPUTF8 for a domain like ``müller.de``.
    """
    local_part, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    try:
        return f"{local_part}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError as exc:
        raise ValueError(f"invalid domain in {address!r}: {exc}") from None


def build_mime(message: OutgoingMessage) -> bytes:
    """The message as it goes on the wire: multipart/alternative (text/plain, then
    text/html), UTF-8, quoted-printable, CRLF line ends, 7-bit throughout.

    The email package encodes and folds the address, subject and references headers
    (RFC 2047 for non-ASCII text), once per distinct value; plain ASCII headers and the
    two body parts, whose headers never vary, are written here, the bodies with
    :mod:`binascii`'s quoted-printable encoder. Building the whole message with the email
    package took about seven times as long (docs/performance.md).

    Raises :class:`HeaderError` naming the field when a header value contains a line
    break, control character or encoded word, or a header would not be written as one
    header; :class:`ValueError` when an address does not parse, a Message-ID is
    malformed, or the date is naive.
    """
    for field in (
        "subject",
        "sender_name",
        "recipient_name",
        "sender_email",
        "recipient_email",
        "reply_to",
    ):
        value = getattr(message, field)
        if value is not None:
            _refuse_line_breaks(field, value)
    if message.date.tzinfo is None or message.date.utcoffset() is None:
        raise ValueError("date must be timezone-aware")

    # "=_" cannot occur in quoted-printable text, so the boundary never collides.
    boundary = f"=_{uuid.uuid4().hex}"
    # Plain ASCII values (a date, validated Message-IDs, fixed texts) are written as they
    # are; the rest is encoded and folded by the email package, once per distinct value
    # (sender, reply address and subject repeat from email to email).
    lines = [
        f"Date: {email.utils.format_datetime(message.date)}\r\n".encode("ascii"),
        f"Message-ID: {_message_id('message_id', message.message_id)}\r\n".encode("ascii"),
        _address_header("From", "sender_email", message.sender_email, message.sender_name),
        _address_header("To", "recipient_email", message.recipient_email, message.recipient_name),
    ]
    if message.reply_to is not None:
        lines.append(_address_header("Reply-To", "reply_to", message.reply_to, ""))
    if message.in_reply_to is not None:
        in_reply_to = _message_id("in_reply_to", message.in_reply_to)
        lines.append(f"In-Reply-To: {in_reply_to}\r\n".encode("ascii"))
    if message.references:
        references = " ".join(
            _message_id("references", reference) for reference in message.references
        )
        lines.append(_folded("References", references))
    lines.append(_folded("Subject", message.subject))
    lines.append(b"MIME-Version: 1.0\r\n")
    lines.append(
        f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n'.encode("ascii")
    )
    lines.append(b"\r\n")
    lines.append(_text_part(boundary, "plain", message.body_text))
    lines.append(_text_part(boundary, "html", message.body_html))
    lines.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(lines)


@functools.lru_cache(maxsize=1024)
def _folded(name: str, value: str) -> bytes:
    """:func:`_fold` of a text value, once per distinct value."""
    return _fold(name, value)


def _fold(name: str, value: str | Address) -> bytes:
    """One header, encoded (RFC 2047 where needed) and folded, with its CRLF."""
    try:
        folded = MIME_POLICY.fold_binary(name, MIME_POLICY.header_store_parse(name, value)[1])
    except (email.errors.MessageError, ValueError, IndexError, TypeError) as exc:
        # MessageError covers HeaderParseError, and HeaderWriteError where the email
        # package has it (3.12.5 and later); ValueError covers UnicodeError.
        raise HeaderError(f"{name} cannot be written: {type(exc).__name__}") from None
    _check_written(name, folded)
    return folded


def _check_written(name: str, folded: bytes) -> None:
    """Refuse a written header that is not exactly one header, or decodes to line breaks."""
    if not folded.startswith(name.encode("ascii") + b":") or not folded.endswith(b"\r\n"):
        raise HeaderError(f"{name} was not written as one header")
    lines = folded[:-2].split(b"\r\n")
    for line in lines:
        if any((byte < 32 and byte != 9) or byte == 127 for byte in line):
            raise HeaderError(f"{name} must not contain line breaks or control characters")
    for line in lines[1:]:
        # A continuation line starts with white space and holds more than white space;
        # anything else would be a header of its own, or the end of the headers.
        if line[:1] not in (b" ", b"\t") or not line.strip():
            raise HeaderError(f"{name} must not contain line breaks")
    unfolded = b"".join(lines).decode("ascii", errors="replace").split(":", 1)[1]
    try:
        parts = email.header.decode_header(unfolded)
    except email.errors.HeaderParseError:
        raise HeaderError(f"{name} cannot be read back") from None
    for part, charset in parts:
        if isinstance(part, str):
            text = part
        else:
            try:
                text = part.decode(charset or "ascii", errors="replace")
            except LookupError:  # "unknown-8bit" and the like: every byte counts
                text = part.decode("latin-1")
        _refuse_line_breaks(name, text, encoded_words=False)


@functools.lru_cache(maxsize=1024)
def _address_header(name: str, field: str, addr_spec: str, display_name: str) -> bytes:
    return _fold(name, _address(field, addr_spec, display_name))


def _text_part(boundary: str, subtype: str, text: str) -> bytes:
    # Every line end (CRLF, LF or a lone CR) travels as CRLF.
    lines = _LINE_END.sub("\n", text)
    encoded = binascii.b2a_qp(lines.encode("utf-8"), istext=True)
    return b"".join(
        (
            f"--{boundary}\r\n"
            f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: {BODY_TRANSFER_ENCODING}\r\n\r\n".encode("ascii"),
            encoded.replace(b"\n", b"\r\n"),
            b"\r\n",
        )
    )


def _refuse_line_breaks(field: str, value: str, *, encoded_words: bool = True) -> None:
    # Besides CR and LF, any other control or line-separator character could be turned
    # into a line break by some mail software on the way; none belongs in a header. Nor
    # does an encoded word: the email package would decode it, line breaks and all.
    for character in value:
        if character in "\r\n" or unicodedata.category(character) in _UNSAFE_CATEGORIES:
            raise HeaderError(f"{field} must not contain line breaks or control characters")
    if encoded_words and _ENCODED_WORD.search(value):
        raise HeaderError(f"{field} must not contain an encoded word (=?...?=)")


def _address(field: str, addr_spec: str, display_name: str = "") -> Address:
    _refuse_line_breaks(field, addr_spec)
    try:
        address = Address(display_name=display_name, addr_spec=ascii_address(addr_spec))
    except (ValueError, IndexError, email.errors.HeaderParseError) as exc:
        raise ValueError(f"{field} is not a valid address: {exc}") from None
    if not address.username or not address.domain:
        raise ValueError(f"{field} is not a valid address: {addr_spec!r}")
    return address


def _message_id(field: str, value: str) -> str:
    _refuse_line_breaks(field, value)
    if not _MESSAGE_ID.fullmatch(value) or not value.isascii():
        raise ValueError(f"{field} is not a valid Message-ID: {value!r}")
    return value
