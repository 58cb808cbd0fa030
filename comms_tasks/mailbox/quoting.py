"""A reply's new text: the body part read, the quoted original cut (mail-parser-reply in
German and English, Outlook's separators, mobile signatures), bounded."""

from __future__ import annotations

import re
from email.message import Message

from mailparser_reply.parser import EmailMessage

from comms_tasks.contracts.limits import MAX_TEXT
from comms_tasks.mailbox import _mime

# Languages of the quote headers the reply parser cuts at ("Am ... schrieb ...:", "Von:").
REPLY_LANGUAGES = ("de", "en")


# What mobile mail apps append, and the separator Outlook leaves above a quoted original.
_SENT_FROM = re.compile(
    r"^\s*(?:von meinem \S+(?: \S+){0,3} gesendet|gesendet von meinem \S+(?: \S+){0,3}|"
    r"sent from my \S+(?: \S+){0,3}|get outlook for \S+(?: \S+){0,2}|"
    r"diese nachricht wurde von meinem \S+(?: \S+){0,3} gesendet\.?)\s*$",
    re.IGNORECASE | re.MULTILINE,
)


_SEPARATOR = re.compile(
    r"^\s*-{2,}\s*(?:ursprüngliche nachricht|original message|weitergeleitete nachricht|"
    r"forwarded message)\s*-{2,}\s*$",
    re.IGNORECASE | re.MULTILINE,
)


_QUOTED_LINE = re.compile(r"^\s*>.*$\n?", re.MULTILINE)


# The reply parser's patterns backtrack on long lines, quadratically in their length (a
# line of 60,000 characters of "Am " took 17 s; 60 lines of 1,000 of "On " 4 s): it
# reads at most this much, in lines of at most this length (a longer paragraph is
# broken at a space). The new text comes first and only MAX_TEXT of it is kept anyway.
MAX_PARSED_CHARS = 20_000


MAX_LINE = 400


class _Replies(EmailMessage):
    """mail-parser-reply's split of a body into its replies, without its search for each
    reply's signature and disclaimers: only the first reply's text is used, with its
    signature (``content``, ``full_body``), and those searches took as long as the split."""

    def _process_signatures_disclaimers(self, text: str) -> tuple[list[str], str]:
        return [], ""


def _body_text(message: Message) -> tuple[str, str | None]:
    """The reply's own text part (plain preferred, else HTML as text), or a defect."""
    html: Message | None = None
    for kind, part in _mime.texts(_mime.walk(message)):
        if kind == "text/plain":
            return _mime.part_text(part)
        html = html or part
    if html is not None:
        text, defect = _mime.part_text(html)
        return _mime.html_to_text(text), defect
    return "", None


def reply_text(text: str) -> str | None:
    """The new text of a human reply: quoted original, quote header, separator and
    "Sent from my iPhone" lines removed; None when nothing is left."""
    text = _short_lines(_mime.clean_text(text[:MAX_PARSED_CHARS]))
    try:
        parsed = _Replies(text=text, languages=list(REPLY_LANGUAGES)).read()
        first = parsed.replies[0] if parsed.replies else None
    except Exception:  # noqa: BLE001 - a regex library on a stranger's text
        first = None
    if first is not None:
        # When the message starts with a quote header (inline answers), the first part
        # is the quote itself: keep it without its header, and without the quoted lines.
        text = first.full_body if first.headers else first.content
    text = _QUOTED_LINE.sub("", text)
    separator = _SEPARATOR.search(text)
    if separator:
        text = text[: separator.start()]
    text = _SENT_FROM.sub("", text)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.split("\n")))
    text = text.strip()
    if not text:
        return None
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _short_lines(text: str) -> str:
    """``text`` with every line longer than :data:`MAX_LINE` broken, at a space if any."""
    if all(len(line) <= MAX_LINE for line in text.split("\n")):
        return text
    lines = []
    for line in text.split("\n"):
        while len(line) > MAX_LINE:
            cut = line.rfind(" ", 1, MAX_LINE)
            cut = cut if cut > 0 else MAX_LINE
            lines.append(line[:cut])
            line = line[cut:].lstrip(" ")
        lines.append(line)
    return "\n".join(lines)
