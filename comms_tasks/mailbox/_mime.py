"""Reading a stranger's message without trusting it: the parts classify and match share.

Every function here takes whatever arrived and never raises. Messages are parsed with
the ``compat32`` policy, and headers are read as their raw values
(:meth:`Message.raw_items`), never through the email package's header objects: those
are slow (the modern policy builds one each time a part's Content-Type is asked, parsing
included, which made parsing alone ten times slower) and raise on some malformed values.
The callers pick out only what has a strict shape (addresses, Message-IDs, tokens, status
codes) and drop the rest; :func:`decoded` turns RFC 2047 words into text where a value
is shown (a subject).
"""

from __future__ import annotations

import email.errors
import email.parser
import email.policy
import email.utils
import re
import unicodedata
from collections.abc import Iterable, Iterator
from email.message import Message
from html.parser import HTMLParser

from comms_tasks.mail.addresses import _ADDRESS, MAX_ADDRESS

# The largest message read whole. Larger ones are kept for operators with a reason; their
# header block is still read for matching.
MAX_MESSAGE_BYTES = 10 * 1024 * 1024
# The header block read from a message too large to parse whole.
MAX_HEADER_BYTES = 256 * 1024
# A header value is cut to this before anything looks into it.
MAX_HEADER_VALUE = 16 * 1024
# The width of emails.message_id.
MAX_MESSAGE_ID = 300
# The text of a body part read for a reply, before the reply parser cuts it.
MAX_BODY_CHARS = 64 * 1024

# Bytes that were not text, kept by surrogateescape: the header parser replaces them.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_LINE_FOLD = re.compile(r"\r?\n[ \t]*|\r")
# <local@domain> in printable ASCII without white space or a second bracket.
_MESSAGE_ID = re.compile(r"<[!-;=?-~]{1,250}@[!-;=?-~]{1,250}>")
_PLAIN_MESSAGE_ID = re.compile(rf"\A{_MESSAGE_ID.pattern}\Z")
# Structural damage after which the body cannot be read as what it claims to be.
_FATAL_DEFECTS = (
    email.errors.NoBoundaryInMultipartDefect,
    email.errors.StartBoundaryNotFoundDefect,
    email.errors.MultipartInvariantViolationDefect,
    email.errors.InvalidMultipartContentTransferEncodingDefect,
)
# Categories removed from any text we keep: controls (C0, DEL, C1), format characters
# (bidi overrides, zero-width), lone surrogates (undecodable bytes), line and paragraph
# separators, private use and unassigned code points.
_UNSAFE_TEXT = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn"})
_NOT_PLAIN_ASCII = re.compile(r"[^\x20-\x7e\n\t]")


def parse(raw: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message | None:
    """The message, or None when it is larger than ``max_bytes`` or not readable at all."""
    if not isinstance(raw, bytes | bytearray) or len(raw) > max_bytes:
        return None
    try:
        message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(bytes(raw))
    except Exception:  # noqa: BLE001 - a stranger's bytes: any failure means "unreadable"
        return None
    return message if isinstance(message, Message) else None


def parse_headers(raw: bytes) -> Message | None:
    """Only the header block of ``raw`` (of a message too large to parse whole)."""
    if not isinstance(raw, bytes | bytearray):
        return None
    head = bytes(raw[:MAX_HEADER_BYTES])
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = head.find(separator)
        if end >= 0:
            head = head[:end]
            break
    try:
        parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
        message = parser.parsebytes(head)
    except Exception:  # noqa: BLE001 - a stranger's bytes
        return None
    return message if isinstance(message, Message) else None


def header_values(message: Message, name: str) -> list[str]:
    """Every raw value of header ``name``, unfolded and cut to a bounded length."""
    wanted = name.lower()
    values = []
    try:
        for key, value in message.raw_items():
            if isinstance(key, str) and key.lower() == wanted:
                values.append(_LINE_FOLD.sub(" ", str(value)[:MAX_HEADER_VALUE]).strip())
    except Exception:  # noqa: BLE001 - header soup
        return values
    return values


def first_header(message: Message, name: str) -> str | None:
    values = header_values(message, name)
    return values[0] if values else None


def decoded(value: str, limit: int = 1000) -> str:
    """A header value with its RFC 2047 encoded words decoded (as read), else as it is."""
    value = value[:limit]
    if "=?" not in value and _SURROGATE.search(value) is None:
        # Nothing to decode: the header parser would give it back unchanged (and it is
        # the slowest step of reading a message's Subject, Message-ID and Date).
        return value
    try:
        return str(email.policy.default.header_factory("subject", value))
    except Exception:  # noqa: BLE001 - header soup
        return value


def addresses_in(value: str) -> Iterator[str]:
    """The plain addresses written anywhere in a header value, display names ignored."""
    for found in _ADDRESS.finditer(value):
        if len(found.group()) <= MAX_ADDRESS:
            yield found.group()


def message_ids_in(value: str) -> list[str]:
    """The ``<local@domain>`` ids in a header value, in order, each at most 300 characters."""
    return [m.group() for m in _MESSAGE_ID.finditer(value) if len(m.group()) <= MAX_MESSAGE_ID]


def is_message_id(value: str) -> bool:
    return len(value) <= MAX_MESSAGE_ID and _PLAIN_MESSAGE_ID.match(value) is not None


def walk(message: Message) -> Iterator[Message]:
    """Every part, depth first, stopping quietly where the structure is broken."""
    try:
        yield from message.walk()
    except Exception:  # noqa: BLE001 - a broken structure ends the walk, not the caller
        return


def content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:  # noqa: BLE001
        return "text/plain"


def param(part: Message, name: str, header: str = "content-type") -> str | None:
    """A parameter of a header, RFC 2231 values (``charset*=utf-8''...``) decoded."""
    try:
        value = part.get_param(name, header=header)
        if isinstance(value, tuple):  # compat32 leaves an RFC 2231 value in three parts
            value = email.utils.collapse_rfc2231_value(value)
    except Exception:  # noqa: BLE001
        return None
    return value if isinstance(value, str) else None


def is_attachment(part: Message) -> bool:
    disposition = (first_header(part, "Content-Disposition") or "").lower()
    return disposition.startswith("attachment")


def fatal_defect(message: Message) -> str | None:
    """A one-line reason when the MIME structure of the message is broken."""
    for part in walk(message):
        for defect in getattr(part, "defects", ()):
            if isinstance(defect, _FATAL_DEFECTS):
                return f"broken MIME structure: {type(defect).__name__}"
    return None


def part_text(part: Message) -> tuple[str, str | None]:
    """The decoded text of a leaf part, and a reason when its charset could not be used.

    The charset is taken from the part; an unknown one is a reason (the text is still
    decoded, as UTF-8 with replacement characters, for operators to read).
    """
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001
        return "", "undecodable body part"
    if not isinstance(payload, bytes):
        return "", None
    charset = (param(part, "charset") or "us-ascii").strip().lower()
    try:
        return payload.decode(_charset_alias(charset), errors="replace"), None
    except LookupError:
        return payload.decode("utf-8", errors="replace"), "unknown charset"
    except Exception:  # noqa: BLE001 - codecs may raise anything on odd input
        return payload.decode("utf-8", errors="replace"), "undecodable charset"


def _charset_alias(charset: str) -> str:
    # Latin-1 labels in mail are Windows-1252 in practice (curly quotes, the euro sign).
    if charset in {"iso-8859-1", "latin-1", "latin1", "us-ascii", "ascii"}:
        return "cp1252"
    return charset


def is_safe_character(ch: str) -> bool:
    """Whether one character may stay in a text we keep (tabs and newlines may)."""
    return ch in "\n\t" or (ch.isprintable() and unicodedata.category(ch) not in _UNSAFE_TEXT)


def _kept(found: re.Match[str]) -> str:
    return found.group() if is_safe_character(found.group()) else ""


def clean_text(text: str) -> str:
    """Text without control, format or surrogate characters; tabs and newlines kept.

    Printable ASCII always stays: only the other characters (a few in a German reply)
    are looked up one by one.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _NOT_PLAIN_ASCII.sub(_kept, text)


def one_line(text: str, limit: int) -> str:
    """``text`` as one line of at most ``limit`` characters, white space collapsed."""
    line = " ".join(clean_text(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class _TextOfHtml(HTMLParser):
    """Visible text of an HTML body: tags dropped, nothing fetched or run."""

    _SKIPPED = frozenset({"script", "style", "head", "title", "template", "blockquote"})
    _BLOCKS = frozenset(
        {"p", "div", "br", "li", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6", "hr"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIPPED:
            self._skipping += 1
        elif tag in self._BLOCKS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIPPED:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCKS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.chunks.append(data)


def html_to_text(html: str) -> str:
    """The visible text of an HTML body (quoted ``<blockquote>`` originals left out)."""
    parser = _TextOfHtml()
    try:
        parser.feed(html[:MAX_BODY_CHARS])
        parser.close()
    except Exception:  # noqa: BLE001, S110 - html.parser copes with almost anything; what
        pass  # it read before it gave up is kept
    lines = [" ".join(line.split()) for line in "".join(parser.chunks).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def texts(parts: Iterable[Message]) -> Iterator[tuple[str, Message]]:
    """The inline text/plain and text/html leaves among ``parts``, with their types."""
    for part in parts:
        kind = content_type(part)
        if kind in {"text/plain", "text/html"} and not is_attachment(part):
            yield kind, part
