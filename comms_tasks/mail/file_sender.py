"""The file backend: each message an ``.eml`` file under the var folder (the embedded
default; nothing is delivered), and the outbox copies retention removes."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from comms_tasks.mail.message import OutgoingMessage, build_mime
from comms_tasks.mail.sender import SendResult, _failure, _go_ahead

log = logging.getLogger(__name__)


_UNSAFE_FILE_CHARACTERS = re.compile(r"[^A-Za-z0-9._@-]")


class FileSender:
    """Writes each message as an ``.eml`` file; a resend overwrites the same file.

    The file is a copy of the email's body: erasure and retention delete it with the
    body (:func:`remove_outbox_copy`, found by :func:`outbox_path`).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path_for(self, message: OutgoingMessage) -> Path:
        return outbox_path(self.folder, message.email_id, message.message_id)

    def send(
        self,
        messages: Iterable[OutgoingMessage],
        before_handover: Callable[[], None] = _go_ahead,
        before_close: Callable[[], None] = _go_ahead,
    ) -> Iterator[SendResult]:
        # No connection to close: ``before_close`` has nothing to wait for.
        for message in messages:
            try:
                content = build_mime(message)
            except ValueError as exc:
                yield _failure(message, exc)
                continue
            before_handover()
            try:
                self._write(self.path_for(message), content)
            except (OSError, ValueError) as exc:
                yield _failure(message, exc)
            else:
                yield SendResult(message.email_id, delivered=True)

    def _write(self, path: Path, content: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary file in the same folder, then an atomic rename: a reader never
        # sees half a message, and a crash leaves no broken .eml behind.
        descriptor, temporary_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp"
        )
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary_name, path)
        except BaseException:
            Path(temporary_name).unlink(missing_ok=True)
            raise


def outbox_path(folder: Path, email_id: int, message_id: str) -> Path:
    """Where the file backend keeps the email's copy: named by its id and Message-ID."""
    safe_id = _UNSAFE_FILE_CHARACTERS.sub("_", message_id.strip("<>"))
    return folder / f"{email_id:08d}-{safe_id}.eml"


_OUTBOX_NAME = re.compile(r"(\d{1,19})-.+\.eml")


def outbox_email_ids(folder: Path) -> set[int]:
    """The email ids the ``.eml`` files in ``folder`` are named by."""
    if not folder.is_dir():
        return set()
    return {
        int(found.group(1))
        for path in folder.iterdir()
        if (found := _OUTBOX_NAME.fullmatch(path.name)) is not None
    }


def remove_outbox_copy(folder: Path, email_id: int, message_id: str) -> bool:
    """Delete the email's ``.eml`` copy, if there is one; True if one was deleted.

    A file that cannot be deleted is logged and left for the next purge: erasure and
    retention of the rows must not fail on a copy.
    """
    path = outbox_path(folder, email_id, message_id)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("outbox copy of email %d not removed: %s", email_id, type(exc).__name__)
        return False
    return True
