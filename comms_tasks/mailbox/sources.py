"""Where the mail comes from: one interface, a Maildir and an IMAP backend.

A source lists the messages waiting in its inbox (oldest first, read without marking
them seen) and moves one, by its key, into a folder by kind once the caller has
committed what the message changed. Nothing is ever deleted: a moved message lives on
in its folder. Two sources on one mailbox at once corrupt nothing — both see the same
messages, and of two moves of one message the second finds it gone and does nothing —
but the caller serializes polls (an advisory lock) so that a message is applied once.

Errors are of two kinds, each one exception type: :class:`MailboxTemporaryError` (the
server is down, restarting, slow: the next poll may work) and
:class:`MailboxPermanentError` (a wrong password, a missing folder: an operator must act).
Their messages are one line and never hold a password or anything of a message.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Protocol, Self

if TYPE_CHECKING:
    from comms_tasks.settings import Settings

# Where a message goes once applied, by what the caller made of it. Folder paths use "/"
# between levels whatever the server's own separator (the IMAP backend translates; the
# Maildir backend makes Maildir++ folders such as ".Processed.Replies").
REPLIES = "Processed/Replies"
AUTO_REPLIES = "Processed/AutoReplies"
BOUNCES = "Processed/Bounces"
UNMATCHED = "Unmatched"

FOLDERS: Mapping[str, str] = MappingProxyType(
    {
        "reply": REPLIES,  # a human reply, matched to its email
        "auto_reply": AUTO_REPLIES,  # out-of-office and other automatic answers
        "bounce": BOUNCES,  # delivery status notifications, permanent and delayed
        "unrelated": UNMATCHED,  # lists, spam, mail that is about nothing we sent
        "unmatched": UNMATCHED,  # about an email of ours, but we cannot tell which
    }
)
ALL_FOLDERS = frozenset(FOLDERS.values())

# A message above the byte limit is read as its header, itself cut at this size (or a
# quarter of the limit, if smaller): real headers are a few kilobytes, and even a
# bounce's whole Received chain stays far below.
MAX_HEADER_BYTES = 256 * 1024


def header_limit(max_bytes: int) -> int:
    """How much of an oversized message's header is read, under a byte limit."""
    return min(MAX_HEADER_BYTES, max(max_bytes // 4, 1))


def folder_for(kind: str) -> str:
    """The folder of messages of ``kind`` (a key of :data:`FOLDERS`)."""
    try:
        return FOLDERS[kind]
    except KeyError:
        raise ValueError(f"no folder for kind {kind!r}; one of {', '.join(FOLDERS)}") from None


@dataclasses.dataclass(frozen=True)
class Fetched:
    """One message as the mailbox holds it.

    ``key`` is the mailbox's identity of the message in the source folder: for IMAP
    ``"<uidvalidity>:<uid>"``, for a Maildir the file's unique name. ``size`` is the
    whole message's size in bytes. A message larger than ``COMMS_MAILBOX_MAX_BYTES`` is
    fetched as its header only: then ``raw`` is the header block (up to that limit too)
    and ``headers_only`` is true, so the caller can still match and classify it by its
    headers and keep it with a reason instead of holding megabytes in memory.
    """

    key: str
    raw: bytes
    size: int
    headers_only: bool = False

    @functools.cached_property
    def sha256(self) -> str:
        """The hash of ``raw``, computed once: it finds the message again and names its row."""
        return hashlib.sha256(self.raw).hexdigest()


class MailboxError(Exception):
    """Something went wrong reading or moving mail; the message is one line, no secrets."""


class MailboxTemporaryError(MailboxError):
    """The mailbox cannot be reached now (refused, reset, timed out, restarting): retry later."""


class MailboxPermanentError(MailboxError):
    """The mailbox refuses us until someone acts (authentication, missing folder, TLS trust)."""


class StaleKeyError(MailboxError):
    """A key issued under another UIDVALIDITY: its UID may name another message now.

    Nothing was moved. The message, if still in the source folder, is fetched again
    under a new key on the next poll.
    """


class MailSource(Protocol):
    """A mailbox to read: a context manager that closes its connection on exit."""

    @property
    def name(self) -> str:
        """Where it reads, for logs and ``comms status``: never a password."""
        ...

    def fetch_new(self, limit: int) -> list[Fetched]:
        """The messages in the source folder, oldest first, at most ``limit``.

        Reading never marks a message seen and never deletes one. The total of ``raw``
        bytes of one call stays within the source's byte limit (the first message
        always comes), so a caller that wants more calls again.
        """
        ...

    def move(self, key: str, folder: str) -> None:
        """Move the message ``key`` to ``folder`` (a value of :data:`FOLDERS`).

        Missing folders are created. A message that is no longer in the source folder
        (moved already, by us before a crash or by someone else) is not an error.
        """
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


class ClosingSource:
    """The context manager both backends share: ``close()`` on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def check_folder(folder: str) -> str:
    """``folder`` if it is one of ours; moving anywhere else is a caller's bug."""
    if folder not in ALL_FOLDERS:
        raise ValueError(
            f"not a mailbox folder: {folder!r}; one of {', '.join(sorted(ALL_FOLDERS))}"
        )
    return folder


def open_source(settings: Settings) -> MailSource:
    """The configured mailbox: IMAP, or the Maildir under the var folder (the default).

    Nothing connects yet: the IMAP backend logs in at its first fetch or move.
    """
    if settings.mailbox_backend == "imap":
        from comms_tasks.mailbox.imap import ImapSource

        return ImapSource.from_settings(settings)
    from comms_tasks.mailbox.maildir import MaildirSource

    return MaildirSource(settings.mailbox_folder, max_bytes=settings.mailbox_max_bytes)
