"""The embedded default: a Maildir under the var folder (stdlib ``mailbox``).

The inbox is the Maildir's root (``new/`` and ``cur/``); the folders are Maildir++
subfolders (``.Processed.Replies``, ``.Unmatched``), the layout Dovecot and Courier use,
so the same directory can be served over IMAP. A move is one ``rename`` of the file,
keeping its name and flags: atomic, and a second move of the same key finds nothing. A
message this source fetched is moved by the path it was read from, without listing the
inbox again (a full inbox would make a poll cost the square of its size); only a file
renamed since (a reader changed its flags) is looked for.
"""

from __future__ import annotations

import contextlib
import mailbox
import os
import re
from pathlib import Path

from comms_tasks.mailbox.sources import (
    ClosingSource,
    Fetched,
    MailboxPermanentError,
    MailboxTemporaryError,
    check_folder,
    header_limit,
)

# Maildir subfolders of a message file; "tmp" holds deliveries still being written.
_DELIVERED = ("new", "cur")
# The key is the file name up to the info part (":2,FLAGS"), as in the stdlib.
_INFO_SEPARATOR = ":"
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_DIGITS = re.compile(r"(\d+)")


def _natural(name: str) -> tuple[object, ...]:
    # Delivery names start with a time and counters, not zero-padded: compare as numbers.
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(name))


class MaildirSource(ClosingSource):
    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root.resolve()
        self.max_bytes = max_bytes
        self._maildir: mailbox.Maildir | None = None
        # Where each fetched message was read, by key: its move is then one rename.
        self._fetched: dict[str, Path] = {}

    @property
    def name(self) -> str:
        return f"maildir:{self.root}"

    def _open(self) -> mailbox.Maildir:
        if self._maildir is None:
            try:
                self.root.parent.mkdir(parents=True, exist_ok=True)
                self._maildir = mailbox.Maildir(self.root, factory=None, create=True)
            except OSError as exc:
                raise _permanent(self, "cannot open the Maildir", exc) from None
        return self._maildir

    def fetch_new(self, limit: int) -> list[Fetched]:
        self._open()
        waiting = sorted(self._inbox_files(), key=lambda item: (item[0], _natural(item[1].name)))
        fetched: list[Fetched] = []
        total = 0
        for _, path in waiting:
            if len(fetched) >= limit:
                break
            try:
                message = self._read(path)
            except FileNotFoundError:
                continue  # moved by another source, or re-flagged by a reader: next poll
            except OSError as exc:
                raise _temporary(self, "cannot read a message", exc) from None
            if fetched and total + len(message.raw) > self.max_bytes:
                break
            total += len(message.raw)
            fetched.append(message)
            self._fetched[message.key] = path
        return fetched

    def _inbox_files(self) -> list[tuple[int, Path]]:
        files = []
        for subfolder in _DELIVERED:
            try:
                entries = list(os.scandir(self.root / subfolder))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _temporary(self, "cannot list the Maildir", exc) from None
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_file():
                        files.append((entry.stat().st_mtime_ns, Path(entry.path)))
                except FileNotFoundError:
                    continue
        return files

    def _read(self, path: Path) -> Fetched:
        key = path.name.split(_INFO_SEPARATOR, 1)[0]
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size <= self.max_bytes:
                return Fetched(key=key, raw=file.read(), size=size)
            head = file.read(header_limit(self.max_bytes))
        end = _HEADER_END.search(head)
        header = head[: end.end()] if end else head
        return Fetched(key=key, raw=header, size=size, headers_only=True)

    def move(self, key: str, folder: str) -> None:
        check_folder(folder)
        if not key or "/" in key or _INFO_SEPARATOR in key or key.startswith("."):
            raise ValueError("not a Maildir key")
        target = self._folder_path(folder)
        path = self._fetched.pop(key, None)
        if path is not None:
            try:
                # Same subfolder on the other side: new mail stays new, flags stay.
                os.rename(path, target / path.parent.name / path.name)
                return
            except FileNotFoundError:
                pass  # renamed since (its flags) or moved by another source: look for it
            except OSError as exc:
                raise _temporary(self, f"cannot move a message to {folder}", exc) from None
        for subfolder in _DELIVERED:
            try:
                candidates = [
                    entry.name
                    for entry in os.scandir(self.root / subfolder)
                    if entry.name == key or entry.name.startswith(key + _INFO_SEPARATOR)
                ]
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _temporary(self, "cannot list the Maildir", exc) from None
            for file_name in candidates:
                try:
                    # Same subfolder on the other side: new mail stays new, flags stay.
                    os.rename(self.root / subfolder / file_name, target / subfolder / file_name)
                except FileNotFoundError:
                    continue  # another source moved it first: it is where it belongs
                except OSError as exc:
                    raise _temporary(self, f"cannot move a message to {folder}", exc) from None
                return

    def _folder_path(self, folder: str) -> Path:
        """The Maildir++ folder (``Processed/Replies``: ``.Processed.Replies``), made if missing."""
        name = folder.replace("/", ".")
        path = self.root / f".{name}"
        if not (path / "cur").is_dir():
            try:
                with contextlib.suppress(FileExistsError):
                    self._open().add_folder(name)
                # Another source may be making it at the same moment (mailbox.Maildir
                # checks, then makes, and makes nothing in a folder that exists): finish
                # what it may not have made yet.
                for part in ("tmp", "new", "cur"):
                    (path / part).mkdir(mode=0o700, parents=True, exist_ok=True)
                (path / "maildirfolder").touch()
            except OSError as exc:
                raise _permanent(self, f"cannot create folder {folder}", exc) from None
        return path

    def close(self) -> None:
        self._fetched.clear()
        if self._maildir is not None:
            self._maildir.close()
            self._maildir = None


def _describe(source: MaildirSource, what: str, exc: OSError) -> str:
    reason = exc.strerror or type(exc).__name__
    return f"{source.name}: {what}: {reason}"


def _temporary(source: MaildirSource, what: str, exc: OSError) -> MailboxTemporaryError:
    return MailboxTemporaryError(_describe(source, what, exc))


def _permanent(source: MaildirSource, what: str, exc: OSError) -> MailboxPermanentError:
    return MailboxPermanentError(_describe(source, what, exc))
