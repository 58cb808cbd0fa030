"""Mailbox fixtures: a private Dovecot for the session, and one harness over both backends.

``mailbox`` runs a test once on a Maildir and once on IMAP (a fresh user of the session's
Dovecot, so each test has a mailbox of its own). Messages are put in as a mail server
would: IMAP APPEND, or a Maildir delivery.
"""

from __future__ import annotations

import mailbox as stdlib_mailbox
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from comms_tasks.mailbox.imap import ImapSource
from comms_tasks.mailbox.maildir import MaildirSource
from comms_tasks.mailbox.sources import MailSource
from comms_tasks.settings import get_settings
from tests.mailbox.dovecot import PrivateDovecot, dovecot_installed
from tests.mailbox.samples import BOUNCE_ADDRESS, REPLY_ADDRESS
from tests.smtp import SmtpSink

DEFAULT_MAX_BYTES = 10 * 1024 * 1024


def start_dovecot(**options: Any) -> PrivateDovecot:
    if not dovecot_installed():
        pytest.fail("dovecot is not installed: apt-get install dovecot-imapd (.ci/run does)")
    server = PrivateDovecot(**options)
    server.start()
    return server


@pytest.fixture(scope="session")
def dovecot() -> Iterator[PrivateDovecot]:
    """The session's Dovecot: MOVE and UIDPLUS, "." as separator, PLAIN and XOAUTH2."""
    server = start_dovecot(mechanisms="plain login xoauth2")
    yield server
    server.close()


def message(subject: str, body: str = "Hallo,\r\nanbei meine Antwort.\r\n") -> bytes:
    """A plain message with CRLF line ends, as IMAP APPEND wants it."""
    return (
        f"From: Dr. Anna Beispiel <anna@praxis.example>\r\n"
        f"To: antwort@therapievermittlung.example\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@praxis.example>\r\n"
        f"Date: Mon, 2 Dec 2024 09:00:00 +0100\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"\r\n"
        f"{body}"
    ).encode()


def subject_of(raw: bytes) -> str:
    for line in raw.split(b"\n"):
        if line.lower().startswith(b"subject:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError("no Subject")


class ImapHarness:
    backend = "imap"

    def __init__(self, server: PrivateDovecot, folder: str = "INBOX") -> None:
        self.server = server
        self.user = server.new_user()
        self.folder = folder
        if folder != "INBOX":
            with server.client(self.user) as client:
                client.create_folder(folder)

    def append(self, raw: bytes, folder: str | None = None) -> None:
        with self.server.client(self.user) as client:
            client.append(folder or self.folder, raw)

    def source(self, **overrides: Any) -> MailSource:
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.server.port,
            "security": "none",
            "username": self.user,
            "password": lambda: self.server.password,
            "folder": self.folder,
            "timeout": 10,
            "max_bytes": DEFAULT_MAX_BYTES,
        }
        options.update(overrides)
        return ImapSource(**options)

    def server_folder(self, folder: str) -> str:
        return folder.replace("/", self.server.separator)

    def _messages(self, folder: str) -> list[tuple[bytes, tuple[bytes, ...]]]:
        with self.server.client(self.user) as client:
            if not client.folder_exists(folder):
                return []
            client.select_folder(folder, readonly=True)
            uids = sorted(client.search(["ALL"]))
            if not uids:
                return []
            found = client.fetch(uids, ["BODY.PEEK[]", "FLAGS"])
            return [(found[uid][b"BODY[]"], found[uid][b"FLAGS"]) for uid in uids]

    def subjects(self, folder: str | None = None, *, with_deleted: bool = True) -> list[str]:
        """Subjects in ``folder`` (one of ours, or the source folder), oldest first."""
        name = self.folder if folder is None else self.server_folder(folder)
        return [
            subject_of(raw)
            for raw, flags in self._messages(name)
            if with_deleted or b"\\Deleted" not in flags
        ]

    def seen_anywhere(self) -> bool:
        """Whether any message of the user carries ``\\Seen``, in any folder."""
        with self.server.client(self.user) as client:
            folders = [
                name
                for flags, _, name in client.list_folders()
                if not {b"\\Noselect", b"\\NonExistent"} & set(flags)
            ]
        return any(b"\\Seen" in flags for folder in folders for _, flags in self._messages(folder))


class MaildirHarness:
    backend = "maildir"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.maildir = stdlib_mailbox.Maildir(root, create=True)

    def append(self, raw: bytes) -> None:
        self.maildir.add(raw)

    def source(self, **overrides: Any) -> MailSource:
        return MaildirSource(self.root, max_bytes=overrides.get("max_bytes", DEFAULT_MAX_BYTES))

    def subjects(self, folder: str | None = None, *, with_deleted: bool = True) -> list[str]:
        if folder is None:
            box = stdlib_mailbox.Maildir(self.root, create=False)
        else:
            path = self.root / ("." + folder.replace("/", "."))
            if not path.is_dir():
                return []
            box = stdlib_mailbox.Maildir(path, create=False)
        dated = []
        for key in box.iterkeys():
            dated.append((box.get_message(key).get_date(), subject_of(box.get_bytes(key))))
        return [subject for _, subject in sorted(dated)]

    def seen_anywhere(self) -> bool:
        return any("S" in path.name.rpartition(":2,")[2] for path in self.root.rglob("*:2,*"))


Harness = ImapHarness | MaildirHarness


@pytest.fixture(params=["maildir", "imap"])
def mailbox(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    if request.param == "imap":
        return ImapHarness(request.getfixturevalue("dovecot"))
    return MaildirHarness(tmp_path / "mailbox")


@pytest.fixture
def inbox(
    tmp_path: Path, smtp: SmtpSink, committed_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> MaildirHarness:
    """A Maildir the settings point at, with tagged reply and bounce addresses."""
    harness = MaildirHarness(tmp_path / "mailbox")
    monkeypatch.setenv("COMMS_REPLY_ADDRESS", REPLY_ADDRESS)
    monkeypatch.setenv("COMMS_BOUNCE_ADDRESS", BOUNCE_ADDRESS)
    monkeypatch.setenv("COMMS_MAILBOX_BACKEND", "maildir")
    monkeypatch.setenv("COMMS_MAILBOX_DIR", str(harness.root))
    get_settings.cache_clear()
    return harness
