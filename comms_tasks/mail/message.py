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

from comms_tasks.contracts.common import ENCODED_WORD, UNSAFE_CATEGORIES

# CRLF on the wire; non-ASCII header text as RFC 2047 encoded words.
MIME_POLICY = email.policy.SMTP
# Quoted-printable keeps every line short and 7-bit, so no relay needs 8BITMIME, and
# the .eml files of the file backend stay readable.
BODY_TRANSFER_ENCODING = "quoted-printable"

_MESSAGE_ID = re.compile(r"<[^<>\s@]+@[^<>\s@]+>")
_LINE_END = re.compile(r"\r\n?")
# An RFC 2047 encoded word, or anything a lenient decoder might take for one.


class HeaderError(ValueError):
    """A header value that cannot be written as one header: the message is not built.

    A :class:`ValueError`, so the sender treats it as a permanent failure of that email.
    """


@dataclasses.dataclass(frozen=True)
class OutgoingMessage:
    email_id: int
    therapist_id: int  # whom it is for: the email.sent event names them
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
    # The SMTP envelope sender (MAIL FROM), where bounces go; None: ``sender_email``.
    envelope_sender: str | None = None


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

    The address headers are written by :func:`_address_header` (the display name as
    plain words or RFC 2047 encoded words, never folded by the email package, and read
    back to hold exactly one address); the email package encodes and folds the subject
    and references headers, once per distinct value; plain ASCII headers and the
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
    lines.append(_subject_header(message.subject))
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
def _subject_header(subject: str) -> bytes:
    """The Subject header; one that starts with white space is sent as encoded words.

    Readers drop the white space a header value starts with; inside an encoded word it
    stays, so the subject reads back exactly as given.
    """
    if not subject[:1].isspace():
        return _folded("Subject", subject)
    folded = ("\r\n".join(_encoded_phrase("Subject: ", subject)) + "\r\n").encode("ascii")
    _check_written("Subject", folded)
    return folded


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
    """One address header, written here rather than by the email package's folding.

    The policy's refolding wrote a long quoted display name as bare words over several
    lines, dropping its quotes: a name holding ``<x@y>, `` became an address of its own.
    So the display name is written in one of two forms that no folding changes: a short
    name of plain words (letters, digits, dots) on the header's first line, anything else
    (non-ASCII, long, or with any other character) as RFC 2047 encoded words, in which
    ``<``, ``>``, ``,``, ``"`` and the rest are hex escapes, one word per line. The header
    is then read back and must hold exactly the one address, or it is a
    :class:`HeaderError`.
    """
    spec = _address(field, addr_spec).addr_spec
    if not spec.isascii():
        raise ValueError(f"{field} is not a valid address: {addr_spec!r}")
    encoded = False
    if not display_name:
        lines = [f"{name}: {spec}"]
    elif (
        _PLAIN_NAME.fullmatch(display_name)
        and len(header := f"{name}: {_plain_phrase(display_name)} <{spec}>") <= _MAX_LINE
    ):
        lines = [header]
    else:
        encoded = True
        lines = _encoded_phrase(f"{name}: ", display_name)
        if len(lines[-1]) + len(spec) + 3 <= _MAX_LINE:
            lines[-1] += f" <{spec}>"
        else:
            lines.append(f" <{spec}>")
    folded = ("\r\n".join(lines) + "\r\n").encode("ascii")
    _check_written(name, folded)
    _check_one_address(name, folded, spec, display_name, encoded=encoded)
    return folded


# The longest header line we write where we choose the folding (RFC 5322 recommends 78).
_MAX_LINE = 78
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
# Words of RFC 5322 atext, one space apart: written as they are.
_ATOMS = re.compile(rf"[{_ATEXT}]+(?: [{_ATEXT}]+)*")
# The same with dots ("Dr. Anna Weber"): written as one quoted string on one line.
_PLAIN_NAME = re.compile(rf"[{_ATEXT}.]+(?: [{_ATEXT}.]+)*")
# Characters an encoded word in a phrase may hold as they are (RFC 2047 section 5 (3)).
_Q_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_ENCODED_PREFIX = "=?utf-8?q?"
_ENCODED_SUFFIX = "?="


def _plain_phrase(display_name: str) -> str:
    return display_name if _ATOMS.fullmatch(display_name) else f'"{display_name}"'


def _q_encode(character: str) -> str:
    return "".join(
        "_" if byte == 0x20 else chr(byte) if byte in _Q_PLAIN else f"={byte:02X}"
        for byte in character.encode("utf-8")
    )


def _encoded_phrase(prefix: str, display_name: str) -> list[str]:
    """``display_name`` as UTF-8 "Q" encoded words, each on a line of its own.

    Each word ends on a whole character, after a space where one is near: the white space
    between encoded words is not part of the name (RFC 2047 section 6.2), so the name
    reads back exactly as given.
    """
    overhead = len(_ENCODED_PREFIX) + len(_ENCODED_SUFFIX)
    words: list[str] = []
    room = _MAX_LINE - len(prefix) - overhead
    chunk: list[str] = []
    length = 0
    for character in display_name:
        encoded = _q_encode(character)
        if chunk and length + len(encoded) > room:
            # Break after the last space of the chunk, unless that leaves it short.
            cut = max((i + 1 for i, c in enumerate(chunk) if c == "_"), default=0)
            if cut < len(chunk) // 2:
                cut = len(chunk)
            words.append("".join(chunk[:cut]))
            chunk = chunk[cut:]
            length = sum(map(len, chunk))
            room = _MAX_LINE - 1 - overhead
        chunk.append(encoded)
        length += len(encoded)
    words.append("".join(chunk))
    return [
        f"{prefix if index == 0 else ' '}{_ENCODED_PREFIX}{word}{_ENCODED_SUFFIX}"
        for index, word in enumerate(words)
    ]


def _check_one_address(
    name: str, folded: bytes, addr_spec: str, display_name: str, *, encoded: bool
) -> None:
    """Refuse an address header that a reader could take for anything but ``addr_spec``.

    Read back by the plain address parser twice: on the header as written (folds left
    in, as a reader that does not unfold sees it) and unfolded; the name, decoded as RFC
    2047 says, must be the one given. (The email package's own parser agrees on every
    name the tests try, tests/mail/test_header_injection.py; it is not run here, at four
    times the cost of the rest of the header.)
    """
    as_written = folded[:-2].decode("ascii").split(":", 1)[1]
    unfolded = as_written.replace("\r\n", "")
    refused = HeaderError(f"{name} would not hold exactly its one address")
    # A header of one line reads the same both ways: parsed once.
    read = [email.utils.getaddresses([unfolded])]
    if unfolded != as_written:
        read.append(email.utils.getaddresses([as_written]))
    for addresses in read:
        if [address for _, address in addresses] != [addr_spec]:
            raise refused
    if not display_name:
        return
    [(phrase, _)] = read[0]
    if not encoded:
        # Written as plain words (a plain name too long for the first line is encoded).
        if phrase != display_name:
            raise refused
        return
    try:
        shown = str(email.header.make_header(email.header.decode_header(phrase)))
    except (email.errors.MessageError, ValueError, LookupError):
        raise HeaderError(f"{name} cannot be read back") from None
    if shown != display_name:
        raise refused


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
    # (A printable string holds none of them: str.isprintable is false for every Cc, Zl
    # and Zp character, so only the rest is looked at character by character.)
    if not value.isprintable():
        for character in value:
            if character in "\r\n" or unicodedata.category(character) in UNSAFE_CATEGORIES:
                raise HeaderError(f"{field} must not contain line breaks or control characters")
    if encoded_words and ENCODED_WORD.search(value):
        raise HeaderError(f"{field} must not contain an encoded word (=?...?=)")


def _address(field: str, addr_spec: str) -> Address:
    _refuse_line_breaks(field, addr_spec)
    try:
        address = Address(addr_spec=ascii_address(addr_spec))
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
