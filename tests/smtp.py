"""A real SMTP server on loopback for tests, with scripted faults; and TLS helpers.

:class:`SmtpSink` is an aiosmtpd server in a thread. It records every accepted message,
counts connections, and can be told how to answer the next DATA commands (``451 ...``,
``550 ...``, ``drop``, ``hang``) or to refuse a recipient at RCPT. Use the ``smtp_sink``
fixture for a plain server, or build one with TLS from :func:`make_certificates`.
"""

from __future__ import annotations

import asyncio
import collections
import email
import email.message
import email.policy
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

HOST = "127.0.0.1"
# Longer than any client timeout in the tests; cancelled when the client gives up.
HANG_SECONDS = 3600
CERTIFICATE_DAYS = 2


class SmtpSink:
    """aiosmtpd Controller on 127.0.0.1, a free port; counts every accepted message by Message-ID.

    ``tls_context`` with ``implicit_tls`` makes it an SMTPS server (TLS from the first
    byte); without ``implicit_tls`` it offers STARTTLS, and ``require_starttls`` refuses
    mail before it. ``auth=(user, password)`` requires AUTH, offered over TLS only
    (after STARTTLS, or on the implicit-TLS connection) unless ``cleartext_auth``, as a
    local mail catcher does.
    """

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        implicit_tls: bool = False,
        auth: tuple[str, str] | None = None,
        cleartext_auth: bool = False,
        accept_delay: float | Sequence[float] = 0.0,
    ) -> None:
        if (require_starttls or implicit_tls) and tls_context is None:
            raise ValueError("require_starttls and implicit_tls need a tls_context")
        self.host = HOST
        self.port = 0
        self.accepted: list[email.message.EmailMessage] = []
        # (MAIL FROM, RCPT TO list) of each accepted message, in the same order.
        self.envelopes: list[tuple[str, list[str]]] = []
        # Connections opened by clients, and QUIT commands received, since start()/reset().
        self.connections = 0
        self.quits = 0
        self._auth = auth
        # Seconds each accepted message holds the server (and its client) before the reply;
        # a sequence: the first message's, the second's, ..., the last repeated.
        self.accept_delay = accept_delay
        self._delivered = 0
        self._lock = threading.Lock()
        self._script: collections.deque[str] = collections.deque()
        self._refusals: dict[str, str] = {}
        smtp_options: dict[str, Any] = {"server_hostname": "localhost"}
        if tls_context is not None and not implicit_tls:
            smtp_options.update(tls_context=tls_context, require_starttls=require_starttls)
        if auth is not None:
            # aiosmtpd counts only STARTTLS as TLS; an implicit-TLS connection is one too.
            smtp_options.update(
                auth_required=True,
                auth_require_tls=not (implicit_tls or cleartext_auth),
                authenticator=self._authenticate,
            )
        self._controller = _CountingController(
            self,
            _Handler(self),
            hostname=HOST,
            port=0,
            ssl_context=tls_context if implicit_tls else None,
            **smtp_options,
        )

    def start(self) -> None:
        # Bind a free port ourselves: aiosmtpd's Controller wants a fixed one.
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            self.port = int(probe.getsockname()[1])
        self._controller.port = self.port
        self._controller.start()
        # The controller connects once to check that it is up; that is not a client.
        with self._lock:
            self.connections = 0

    def stop(self) -> None:
        self._controller.stop()

    def worker_settings(self) -> dict[str, str]:
        """The environment that makes a worker send its mail here, in the clear."""
        return {
            "COMMS_MAIL_BACKEND": "smtp",
            "COMMS_SMTP_HOST": self.host,
            "COMMS_SMTP_PORT": str(self.port),
            "COMMS_SMTP_SECURITY": "none",
        }

    def message_ids(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(str(message["Message-ID"]) for message in self.accepted)

    def script(self, *replies: str) -> None:
        """Queue the answers to the next DATA commands, one per message.

        ``"451 4.3.0 Try again later"`` and the like are sent as they are; ``"drop"``
        closes the connection instead of answering; ``"hang"`` never answers. A 2xx
        reply, or an empty queue, accepts and records the message.
        """
        for reply in replies:
            if reply not in ("drop", "hang") and not (reply[:3].isdigit() and reply[3:4] == " "):
                raise ValueError(f"not an SMTP reply, 'drop' or 'hang': {reply!r}")
        with self._lock:
            self._script.extend(replies)

    def refuse_recipient(self, address: str, reply: str = "550 5.1.1 mailbox unavailable") -> None:
        """Answer RCPT TO for ``address`` with ``reply``."""
        with self._lock:
            self._refusals[address.lower()] = reply

    def reset(self) -> None:
        """Forget accepted messages, scripts, refusals and the connection count."""
        with self._lock:
            self.accepted.clear()
            self.envelopes.clear()
            self._script.clear()
            self._refusals.clear()
            self.connections = 0
            self.quits = 0

    # Called from the server's thread.

    def _connection_opened(self) -> None:
        with self._lock:
            self.connections += 1

    def _quit_received(self) -> None:
        with self._lock:
            self.quits += 1

    def _next_reply(self) -> str | None:
        with self._lock:
            return self._script.popleft() if self._script else None

    def _refusal(self, address: str) -> str | None:
        with self._lock:
            return self._refusals.get(address.lower())

    def _record(self, envelope: Envelope) -> None:
        with self._lock:
            nth = self._delivered
            self._delivered += 1
        delays = self.accept_delay
        delay = delays if isinstance(delays, float | int) else delays[min(nth, len(delays) - 1)]
        if delay:
            time.sleep(delay)
        content = envelope.original_content or b""
        message = email.message_from_bytes(content, policy=email.policy.default)
        with self._lock:
            self.accepted.append(message)
            self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self._auth is not None
        user, password = self._auth
        expected = LoginPassword(user.encode(), password.encode())
        if isinstance(auth_data, LoginPassword) and auth_data == expected:
            return AuthResult(success=True, auth_data=auth_data)
        # handled=False: aiosmtpd answers "535 5.7.8 Authentication credentials invalid".
        return AuthResult(success=False, handled=False)


class _CountingController(Controller):
    def __init__(self, sink: SmtpSink, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink

    def factory(self) -> SMTP:
        # Called once per accepted connection (not again after STARTTLS).
        self._sink._connection_opened()
        with warnings.catch_warnings():
            # "Requiring AUTH while not requiring TLS": we do, by implicit TLS.
            warnings.simplefilter("ignore", UserWarning)
            return super().factory()


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = self._sink._refusal(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._sink._quit_received()
        return "221 Bye"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self._sink._next_reply()
        if reply == "drop":
            # abort(), not close(): nothing written after this point reaches the client.
            assert server.transport is not None
            server.transport.abort()  # type: ignore[attr-defined]
            await asyncio.sleep(HANG_SECONDS)  # cancelled as the connection goes
        if reply == "hang":
            await asyncio.sleep(HANG_SECONDS)  # until the client gives up and closes
        if reply is None or reply.startswith("2"):
            self._sink._record(envelope)
        return reply or "250 OK"


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A plain SMTP server (no TLS, no AUTH), started for the test and stopped after."""
    sink = SmtpSink()
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


class SilentServer:
    """Accepts TCP connections and never says a word: no 220 greeting, ever."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind((HOST, 0))
        self._listener.listen()
        self._listener.settimeout(0.05)
        self.host = HOST
        self.port = int(self._listener.getsockname()[1])
        self._clients: list[socket.socket] = []
        # Exact once stop() returned: it accepts whatever still waits in the backlog.
        self.connections = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._hold(client)

    def _hold(self, client: socket.socket) -> None:
        self._clients.append(client)
        self.connections += 1

    def stop(self) -> None:
        """Count the connections still in the backlog, then close everything (idempotent)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._thread.join()
        self._listener.setblocking(False)
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                break
            self._hold(client)
        for client in self._clients:
            client.close()
        self._listener.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.stop()


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signed, for ``localhost``/``127.0.0.1``.

    Returns ``(ca_cert, server_cert, server_key)``. Made with the ``openssl`` command,
    as EC keys, which are quick to generate.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = folder / "ca.key", folder / "ca.pem"
    server_key, server_csr, server_cert = (
        folder / "server.key",
        folder / "server.csr",
        folder / "server.pem",
    )
    extensions = folder / "server.ext"
    extensions.write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid:always\n",
        encoding="utf-8",
    )
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *new_key, "-keyout", ca_key, "-out", ca_cert,
        "-days", str(CERTIFICATE_DAYS), "-subj", "/CN=comms test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    _openssl(
        "req", "-new", *new_key, "-keyout", server_key, "-out", server_csr,
        "-subj", "/CN=localhost",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", server_csr, "-CA", ca_cert, "-CAkey", ca_key,
        "-CAcreateserial", "-out", server_cert, "-days", str(CERTIFICATE_DAYS),
        "-extfile", extensions,
    )  # fmt: skip
    return ca_cert, server_cert, server_key


def server_tls_context(server_cert: Path, server_key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert, server_key)
    return context


def _openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True, timeout=30)
