"""The mailbox stage's material: a Maildir of answers to the emails sent, and its baseline.

The messages are the checked-in samples of ``tests/mailbox/samples`` (real-world shapes:
Thunderbird, Outlook, iPhone and Gmail replies, Exchange and Gmail out-of-office answers,
Postfix, Exim, Exchange and Gmail bounces, a mailing list, broken MIME), each made into an
answer to one real email: its reply token in the tagged addresses, its Message-ID in the
thread headers, the therapist's address where the sample has the therapist's, a
Message-ID of its own and today's date. Building them is not timed.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import email
import email.policy
import email.utils
import mailbox
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.mailbox.samples import BOUNCE_ADDRESS, OUR_MESSAGE_ID, REPLY_ADDRESS, SAMPLES

__all__ = [
    "BOUNCE_ADDRESS",
    "MIX",
    "REPLY_ADDRESS",
    "Answered",
    "build_maildir",
    "message_files",
    "parsing_baseline",
]

# Of every 100 messages, as a mailbox of this service sees them: mostly replies, then
# automatic answers, bounces and a few that are about nothing we sent. (sample, count,
# the kind the classifier gives it.)
MIX: tuple[tuple[str, int, str], ...] = (
    ("thunderbird_reply.eml", 25, "reply"),
    ("outlook_reply.eml", 25, "reply"),
    ("iphone_reply.eml", 15, "reply"),
    # From her private address: matched by its token, marked for review.
    ("gmail_reply.eml", 10, "reply"),
    ("exchange_ooo.eml", 5, "auto_reply"),
    ("gmail_ooo.eml", 3, "auto_reply"),
    ("outlook_ooo_legacy.eml", 2, "auto_reply"),
    ("postfix_bounce.eml", 2, "bounce"),
    ("exim_bounce.eml", 1, "bounce"),
    ("exchange_bounce.eml", 1, "bounce"),
    ("gmail_bounce.eml", 1, "bounce"),
    ("postfix_delayed.eml", 3, "delayed"),
    ("mailing_list.eml", 5, "unrelated"),
    ("broken_mime.eml", 1, "unrelated"),
    ("unknown_charset.eml", 1, "unrelated"),
)
# The therapist's address in the samples (as sender, or as the failed recipient of a
# bounce): each becomes the real recipient of the email answered. The Gmail samples'
# private address stays a stranger's, as it is in production.
SAMPLE_RECIPIENTS = (
    b"a.beispiel@praxis-beispiel.example",
    b"a.beispeil@praxis-beispiel.example",
    b"therapie@praxis-nord.example",
    b"anna.beispeil.praxis@gmail.example",
)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(rb"(?im)^(Message-Id:[ \t]*<)")
_DATE = re.compile(rb"(?im)^Date:[^\r\n]*")
SEED = 20261213


@dataclasses.dataclass(frozen=True)
class Answered:
    """An email sent, as its answers need it."""

    reply_token: str
    message_id: str
    recipient: str


def _answer(template: bytes, index: int, to: Answered, date: bytes) -> bytes:
    raw = template.replace(b"{token}", to.reply_token.encode("ascii"))
    raw = raw.replace(OUR_MESSAGE_ID.encode("ascii"), to.message_id.encode("ascii"))
    recipient = to.recipient.encode("ascii")
    for address in SAMPLE_RECIPIENTS:
        raw = raw.replace(address, recipient)
    end = _HEADER_END.search(raw)
    split = end.start() if end else len(raw)
    header, body = raw[:split], raw[split:]
    # A Message-ID and a date of its own, in the message's own header only (a bounce's
    # returned original keeps its own).
    header = _MESSAGE_ID.sub(rb"\g<1>bench%d." % index, header, count=1)
    header = _DATE.sub(b"Date: " + date, header, count=1)
    return header + body


def plan(count: int) -> list[tuple[str, str]]:
    """``count`` (sample, kind) pairs in the mix above, in a shuffled delivery order."""
    pattern = [(name, kind) for name, share, kind in MIX for _ in range(share)]
    rng = random.Random(SEED)
    chosen = [pattern[index % len(pattern)] for index in range(count)]
    rng.shuffle(chosen)
    return chosen


def build_maildir(root: Path, emails: Sequence[Answered], count: int) -> dict[str, int]:
    """``count`` messages in the Maildir's inbox, answering ``emails`` in turn.

    With more messages than emails the emails are answered again (a reply after an
    out-of-office answer, a bounce after a delay notice). Returns the expected count of
    each kind.
    """
    if not emails:
        raise ValueError("no emails to answer")
    templates = {name: (SAMPLES / name).read_bytes() for name, _, _ in MIX}
    date = email.utils.format_datetime(dt.datetime.now(dt.UTC).astimezone()).encode("ascii")
    for subfolder in ("tmp", "new", "cur"):
        (root / subfolder).mkdir(parents=True, exist_ok=True)
    inbox = mailbox.Maildir(root, factory=None, create=False)
    kinds: collections.Counter[str] = collections.Counter()
    try:
        for index, (name, kind) in enumerate(plan(count)):
            inbox.add(_answer(templates[name], index, emails[index % len(emails)], date))
            kinds[kind] += 1
    finally:
        inbox.close()
    return dict(kinds)


def message_files(root: Path) -> list[Path]:
    """Every message file of the Maildir, inbox and folders (delivered, not ``tmp``)."""
    return sorted(
        path
        for path in root.rglob("*")
        if path.parent.name in ("new", "cur") and path.is_file() and not path.name.startswith(".")
    )


def parsing_baseline(paths: Sequence[Path], repeats: int) -> dict[str, Any]:
    """Each file read and parsed with the email package alone: messages/s of each try."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for path in paths:
            email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        rates.append(len(paths) / (time.perf_counter() - started))
    return {"messages": len(paths), "messages_per_second": max(rates), "each": rates}
