"""Production: an IMAP mailbox through IMAPClient, by UID, with verified TLS.

Reading is ``UID FETCH ... BODY.PEEK[]``: it never sets ``\\Seen``. Messages flagged
``\\Deleted`` (by someone, or by a move of ours that stopped half-way) are not new. A
move is ``UID MOVE`` where the server has MOVE; else ``UID COPY``, ``UID STORE
+FLAGS.SILENT (\\Deleted)`` and ``UID EXPUNGE`` of that one UID (UIDPLUS); a server
with neither keeps the copied original flagged ``\\Deleted`` rather than get a plain
``EXPUNGE``, which would also remove every other message someone flagged.

A key is ``"<uidvalidity>:<uid>"`` of the source folder. If the folder's UIDVALIDITY
changed since the key was issued, the UID may name another message: :meth:`move`
raises :class:`StaleKeyError` and moves nothing.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from imapclient import IMAPClient
from imapclient import exceptions as imap_errors

from comms_tasks.mailbox.sources import (
    ClosingSource,
    Fetched,
    MailboxError,
    MailboxPermanentError,
    MailboxTemporaryError,
    StaleKeyError,
    check_folder,
    header_limit,
)

if TYPE_CHECKING:
    from comms_tasks.settings import Settings

Security = Literal["tls", "starttls", "none"]
DEFAULT_PORTS: dict[str, int] = {"tls": 993, "starttls": 143, "none": 143}
# Server replies (RFC 5530 response codes) that say "not now" rather than "never".
_TEMPORARY_CODES = ("[UNAVAILABLE]", "[INUSE]", "[LIMIT]", "[SERVERBUG]")
_MAX_REASON = 200
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_DELETED = b"\\Deleted"
_WHOLE = b"BODY[]"


def _header_item(cap: int) -> tuple[str, bytes]:
    """The FETCH item asking for the first ``cap`` bytes of the header, and its reply key."""
    return f"BODY.PEEK[HEADER]<0.{cap}>", b"BODY[HEADER]<0>"


class ImapSource(ClosingSource):
    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: Security,
        username: str,
        password: Callable[[], str | None] | None = None,
        oauth2_token: Callable[[], str | None] | None = None,
        folder: str = "INBOX",
        timeout: float = 30.0,
        ca_file: Path | None = None,
        max_bytes: int = 10 * 1024 * 1024,
    ) -> None:
        if (password is None) == (oauth2_token is None):
            raise ValueError("give a password or an OAuth2 token, not both or neither")
        self.host = host
        self.port = port
        self.security = security
        self.username = username
        self._password = password
        self._oauth2_token = oauth2_token
        self.folder = folder
        self.timeout = timeout
        self.ca_file = ca_file
        self.max_bytes = max_bytes
        self._client: IMAPClient | None = None
        self._uidvalidity: int | None = None
        self._prefix = ""
        self._delimiter: str | None = "/"
        self._existing: set[str] = set()
        # What to blank out of any error message: the credential last sent.
        self._secrets: list[str] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> ImapSource:
        if settings.imap_host is None or settings.imap_username is None:
            raise ValueError("COMMS_IMAP_HOST and COMMS_IMAP_USERNAME are required for IMAP")
        uses_token = settings.imap_oauth2_token_file is not None
        return cls(
            host=settings.imap_host,
            port=settings.effective_imap_port,
            security=settings.imap_security,
            username=settings.imap_username,
            password=None if uses_token else settings.imap_password_value,
            oauth2_token=settings.imap_oauth2_token_value if uses_token else None,
            folder=settings.imap_folder,
            timeout=settings.imap_timeout,
            ca_file=settings.imap_ca_file,
            max_bytes=settings.mailbox_max_bytes,
        )

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = quote(self.username, safe="")
        return f"imap://{user}@{host}:{self.port}/{quote(self.folder, safe='')}"

    # Reading.

    def fetch_new(self, limit: int) -> list[Fetched]:
        if limit < 1:
            return []
        with self._guard("fetch"):
            client = self._session(reselect=True)
            uids = sorted(client.search(["UNDELETED"]))[:limit]
            if not uids:
                return []
            sizes = client.fetch(uids, ["RFC822.SIZE"])
            header_cap = header_limit(self.max_bytes)
            whole: list[int] = []
            headers: list[int] = []
            planned: list[int] = []
            budget = 0
            for uid in uids:
                size = sizes.get(uid, {}).get(b"RFC822.SIZE")
                if size is None:
                    continue  # expunged since the search
                cost = size if size <= self.max_bytes else header_cap
                if planned and budget + cost > self.max_bytes:
                    break
                budget += cost
                planned.append(uid)
                (whole if size <= self.max_bytes else headers).append(uid)
            bodies = client.fetch(whole, ["BODY.PEEK[]"]) if whole else {}
            item, reply_key = _header_item(header_cap)
            heads = client.fetch(headers, [item]) if headers else {}
            fetched = []
            for uid in planned:
                key = f"{self._uidvalidity}:{uid}"
                # Absent or NIL: expunged meanwhile (another source moved it): skipped.
                if (body := bodies.get(uid, {}).get(_WHOLE)) is not None:
                    fetched.append(Fetched(key=key, raw=bytes(body), size=len(body)))
                elif (head := heads.get(uid, {}).get(reply_key)) is not None:
                    size = int(sizes[uid][b"RFC822.SIZE"])
                    fetched.append(Fetched(key=key, raw=bytes(head), size=size, headers_only=True))
            return fetched

    # Moving.

    def move(self, key: str, folder: str) -> None:
        check_folder(folder)
        uidvalidity, uid = _parse_key(key)
        with self._guard(f"move to {folder}"):
            client = self._session()
            if uidvalidity != self._uidvalidity:
                raise StaleKeyError(
                    f"{self.name}: key {key} is from UIDVALIDITY {uidvalidity}, the folder "
                    f"now has {self._uidvalidity}: not moved"
                )
            target = self._ensure_folder(client, folder)
            flags = self._flags(client, uid)
            if flags is None:
                return  # moved already (by us before a crash, or by another source)
            try:
                self._move_one(client, uid, target, already_flagged=_DELETED in flags)
            except imap_errors.IMAPClientAbortError:
                raise
            except imap_errors.IMAPClientError:
                # A race with another session that moved it first is not an error.
                if self._flags(client, uid) is None:
                    return
                raise

    def _move_one(self, client: IMAPClient, uid: int, target: str, already_flagged: bool) -> None:
        if client.has_capability("MOVE"):
            client.move([uid], target)
            return
        if not already_flagged:
            # Flagged already means a copy of ours stopped before its expunge: the copy
            # is in the folder, so only the expunge is left to do.
            client.copy([uid], target)
            client.add_flags([uid], [_DELETED], silent=True)
        if client.has_capability("UIDPLUS"):
            client.uid_expunge([uid])

    @staticmethod
    def _flags(client: IMAPClient, uid: int) -> tuple[bytes, ...] | None:
        """The message's flags, or None if the folder no longer has that UID."""
        found = client.fetch([uid], ["FLAGS"])
        if uid not in found:
            return None
        return tuple(found[uid].get(b"FLAGS", ()))

    def _ensure_folder(self, client: IMAPClient, folder: str) -> str:
        name = self._server_name(folder)
        if name in self._existing:
            return name
        if not client.folder_exists(name):
            try:
                client.create_folder(name)
            except imap_errors.IMAPClientAbortError:
                raise
            except imap_errors.IMAPClientError:
                # Created meanwhile by another source: fine; otherwise a real refusal.
                if not client.folder_exists(name):
                    raise
            try:
                client.subscribe_folder(name)  # so that mail clients show it
            except imap_errors.IMAPClientAbortError:
                raise
            except imap_errors.IMAPClientError:
                pass  # subscribing is a courtesy, not needed for moving
        self._existing.add(name)
        return name

    def _server_name(self, folder: str) -> str:
        """``Processed/Replies`` as the server spells it: its prefix and separator."""
        delimiter = self._delimiter or "-"
        return self._prefix + folder.replace("/", delimiter)

    # The connection.

    def _session(self, reselect: bool = False) -> IMAPClient:
        """A logged-in connection with the source folder selected (connecting if need be)."""
        if self._client is None:
            self._client = self._connect()
            reselect = True
        if reselect:
            selected = self._client.select_folder(self.folder)
            self._uidvalidity = int(selected[b"UIDVALIDITY"])
        return self._client

    def _connect(self) -> IMAPClient:
        credential = self._credential()
        self._secrets = [credential]
        context = ssl.create_default_context(cafile=self.ca_file)
        client = IMAPClient(
            self.host,
            port=self.port,
            ssl=self.security == "tls",
            ssl_context=context if self.security == "tls" else None,
            timeout=self.timeout,
        )
        try:
            if self.security == "starttls":
                if not client.has_capability("STARTTLS"):
                    raise MailboxPermanentError(
                        f"{self.name}: the server does not offer STARTTLS; not logging in in clear"
                    )
                client.starttls(context)
            if self._oauth2_token is not None:
                client.oauth2_login(self.username, credential)
            else:
                client.login(self.username, credential)
            self._learn_namespace(client)
        except BaseException:
            # Closing what a failed TLS handshake left may fail too: keep the first error.
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        self._existing = set()
        return client

    def _credential(self) -> str:
        # Read at every connect, so that a rotated password or token needs no restart.
        reader = self._oauth2_token if self._oauth2_token is not None else self._password
        what = "OAuth2 token" if self._oauth2_token is not None else "password"
        try:
            value = reader() if reader is not None else None
        except OSError as exc:
            raise MailboxPermanentError(
                f"{self.name}: cannot read the {what} file: {exc.strerror or type(exc).__name__}"
            ) from None
        if not value:
            raise MailboxPermanentError(f"{self.name}: the {what} is empty")
        return value

    def _learn_namespace(self, client: IMAPClient) -> None:
        if client.has_capability("NAMESPACE"):
            personal = client.namespace().personal
            if personal:
                prefix, delimiter = personal[0]
                self._prefix = _text(prefix)
                self._delimiter = _text(delimiter) if delimiter else None
                return
        # No NAMESPACE: LIST "" "" answers the hierarchy delimiter.
        listed = client.list_folders("", "")
        self._prefix = ""
        self._delimiter = _text(listed[0][1]) if listed and listed[0][1] else None

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # A dead connection may fail any way to close.
            with contextlib.suppress(Exception):
                client.shutdown()

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn whatever the network or server throws into our two error types."""
        try:
            yield
        except StaleKeyError:
            raise
        except MailboxError as exc:
            self._drop()
            raise type(exc)(self._redact(str(exc))) from None
        except (imaplib.IMAP4.error, OSError) as exc:
            self._drop()
            temporary, reason = classify(exc)
            error = MailboxTemporaryError if temporary else MailboxPermanentError
            raise error(self._redact(f"{self.name}: {what}: {reason}")) from None

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.logout()
        except Exception:  # noqa: BLE001 - the goodbye of a dead connection changes nothing
            with contextlib.suppress(Exception):
                client.shutdown()


def classify(exc: BaseException) -> tuple[bool, str]:
    """Whether an IMAP failure may go away by itself (``temporary``), and why, in one line.

    The reason holds the server's status text at most, never a line of a message: an
    unexpected line (which could be anything the server sent) is not repeated.
    """
    if isinstance(exc, imap_errors.LoginError):
        text = _server_text(exc)
        return _has_temporary_code(text), f"authentication failed: {text}"
    if isinstance(exc, imap_errors.CapabilityError):
        return False, f"not supported by the server: {_server_text(exc)}"
    if isinstance(exc, imaplib.IMAP4.abort):
        text = str(exc)
        detail = f": {_server_text(exc)}" if text.startswith(("socket error", "EOF")) else ""
        return True, f"connection lost{detail}"
    if isinstance(exc, imap_errors.ProtocolError):
        return True, "the server's reply could not be read"
    if isinstance(exc, imaplib.IMAP4.error):
        text = _server_text(exc)
        return _has_temporary_code(text), f"refused: {text}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False, f"certificate verification failed: {exc.verify_message or 'untrusted'}"
    if isinstance(exc, ssl.SSLError):
        return True, f"TLS error: {exc.reason or type(exc).__name__}"
    if isinstance(exc, TimeoutError):
        return True, "timed out"
    if isinstance(exc, OSError):
        return True, f"connection failed: {exc.strerror or type(exc).__name__}"
    return True, type(exc).__name__


def _has_temporary_code(text: str) -> bool:
    upper = text.upper()
    return any(code in upper for code in _TEMPORARY_CODES)


def _server_text(exc: BaseException) -> str:
    text = _UNPRINTABLE.sub(" ", str(exc)).strip()
    return " ".join(text.split())[:_MAX_REASON] or type(exc).__name__


def _parse_key(key: str) -> tuple[int, int]:
    uidvalidity, sep, uid = key.partition(":")
    if not (sep and uidvalidity.isdigit() and uid.isdigit() and int(uid) > 0):
        raise ValueError("not an IMAP key: expected '<uidvalidity>:<uid>'")
    return int(uidvalidity), int(uid)


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
