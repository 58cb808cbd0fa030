"""The sender interface and its two backends: an SMTP relay, or ``.eml`` files.

A sender takes messages and yields one :class:`SendResult` per message, in order, as
soon as that message's own send returned, so that the caller can record each email as
sent before the next one goes out. Per-message failures are results, never exceptions;
:func:`classify` is the one place that decides whether a failure is worth a retry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal, Protocol

from comms_tasks.mail.conversation import login, transmit
from comms_tasks.mail.message import OutgoingMessage, ascii_address, build_mime
from comms_tasks.settings import Settings

log = logging.getLogger(__name__)

MAX_ERROR_LENGTH = 1000
Security = Literal["none", "starttls", "tls"]


@dataclasses.dataclass(frozen=True)
class SendResult:
    email_id: int
    delivered: bool
    temporary: bool = False  # meaningful when not delivered: True = may succeed later
    error: str | None = None  # the server's reply or the exception, one line


def _go_ahead() -> None:
    """The default of ``before_handover``: nothing to wait for."""


class Sender(Protocol):
    def send(
        self,
        messages: Iterable[OutgoingMessage],
        before_handover: Callable[[], None] = _go_ahead,
        before_close: Callable[[], None] = _go_ahead,
    ) -> Iterator[SendResult]:
        """One result per message, in order, each as soon as that message was sent.

        ``before_handover`` is called before each message is handed over for good (for
        SMTP, before the end of its DATA: the server accepts a message when it reads
        that line); what it raises stops the run without handing the message over. The
        task waits there until the result before is recorded, so that at most one
        accepted message per connection is ever unrecorded. ``before_close`` is called
        before the sender closes a connection of its own accord, at the end or when the
        run stops (the task waits there for the last result): an accepted message is
        not left unrecorded with no connection open. What it raises on the way out of
        an exception is dropped for that exception. (A connection the server closes, a
        421, or one that breaks is gone with its last result perhaps still being
        committed.)

        ``messages`` is read one message ahead of the one in flight (the SMTP sender
        builds the next while the server reads the one before): a caller that stops
        early has had one more taken from it, neither sent nor given a result (the task
        gives back every email without a recorded result).
        """
        ...


class _BuiltAhead:
    """The messages with their MIME form, each built while the server reads the one
    before (``build_next``, the conversation's ``meanwhile``): the build no longer waits
    its turn between two messages. A message that cannot be built comes with its
    ``ValueError`` instead.

    What else interrupts a build ahead (the soft time limit) is raised at the next
    ``take``: the reply to the message before is read and its result handed on first, so
    that it is recorded rather than sent again (the interruption comes that much later,
    at most the SMTP timeout).
    """

    def __init__(self, messages: Iterable[OutgoingMessage]) -> None:
        self._messages = iter(messages)
        self._next: tuple[OutgoingMessage, bytes | ValueError] | None = None
        self._interrupted: BaseException | None = None

    def build_next(self) -> None:
        if self._next is None and self._interrupted is None:
            try:
                self._next = self._build()
            except BaseException as exc:  # noqa: BLE001 - raised at the next take
                self._interrupted = exc

    def take(self) -> tuple[OutgoingMessage, bytes | ValueError] | None:
        if self._interrupted is not None:
            interrupted, self._interrupted = self._interrupted, None
            raise interrupted
        item, self._next = self._next, None
        return item if item is not None else self._build()

    def _build(self) -> tuple[OutgoingMessage, bytes | ValueError] | None:
        message = next(self._messages, None)
        if message is None:
            return None
        try:
            return message, build_mime(message)
        except ValueError as exc:
            return message, exc


class StartTlsUnavailableError(smtplib.SMTPException):
    """The relay does not offer STARTTLS, so we refuse to send in clear."""


def classify(exc: BaseException) -> tuple[bool, str]:
    """Whether a failure may go away by itself (``temporary``), and why, in one line.

    Configuration problems (authentication, certificates, a relay without STARTTLS) are
    temporary on purpose: they are fixed by an operator, and must not fail every email
    of a batch for good in the meantime.
    """
    temporary: bool
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        replies = list(exc.recipients.values())
        temporary = bool(replies) and all(_is_4xx(code) for code, _ in replies)
        described = "; ".join(_reply(code, text) for code, text in replies)
        reason = f"recipient refused: {described or 'no reply'}"
    elif isinstance(exc, smtplib.SMTPAuthenticationError):
        temporary, reason = True, f"authentication failed: {_reply(exc.smtp_code, exc.smtp_error)}"
    elif isinstance(exc, smtplib.SMTPResponseException):
        # A 5xx is final; a 4xx, or a reply we cannot read, may be different next time.
        temporary = not 500 <= exc.smtp_code <= 599
        reason = _reply(exc.smtp_code, exc.smtp_error)
        if isinstance(exc, smtplib.SMTPSenderRefused):
            reason = f"sender refused: {reason}"
    elif isinstance(exc, smtplib.SMTPServerDisconnected):
        temporary, reason = True, f"connection lost: {exc}"
    elif isinstance(exc, StartTlsUnavailableError):
        temporary, reason = True, f"STARTTLS unavailable: {exc}"
    elif isinstance(exc, smtplib.SMTPNotSupportedError):
        temporary, reason = False, f"not supported by the server: {exc}"
    elif isinstance(exc, ssl.SSLCertVerificationError):
        temporary = True
        reason = f"certificate verification failed: {getattr(exc, 'verify_message', None) or exc}"
    elif isinstance(exc, ssl.SSLError):
        temporary, reason = True, f"TLS error: {exc}"
    elif isinstance(exc, TimeoutError):
        temporary, reason = True, (f"timed out: {exc}" if str(exc) else "timed out")
    elif isinstance(exc, ConnectionError):
        temporary, reason = True, f"connection failed: {exc}"
    elif isinstance(exc, OSError):
        # Network trouble (unreachable host, DNS) or an unreadable local file: neither
        # is a property of the message.
        temporary, reason = True, f"{type(exc).__name__}: {exc}"
    elif isinstance(exc, ValueError):
        # The message itself cannot be built or encoded; it never will be.
        temporary, reason = False, f"invalid message: {exc}"
    else:
        temporary, reason = True, f"{type(exc).__name__}: {exc}"
    return temporary, _one_line(reason)


def _is_4xx(code: int) -> bool:
    return 400 <= code <= 499


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return f"{code} {text}"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_ERROR_LENGTH]


def _failure(message: OutgoingMessage, exc: BaseException) -> SendResult:
    temporary, reason = classify(exc)
    return SendResult(message.email_id, delivered=False, temporary=temporary, error=reason)


class SmtpSender:
    """Sends over one SMTP connection per batch, verified TLS unless told ``none``."""

    def __init__(
        self,
        host: str,
        port: int,
        security: Security,
        username: str | None,
        password: Callable[[], str | None],
        timeout: float,
        ca_file: Path | None = None,
        local_hostname: str | None = None,
        insecure_cleartext_auth: bool = False,
    ) -> None:
        if security == "none" and username and not insecure_cleartext_auth:
            # The settings refuse this already; a sender built another way must too.
            raise ValueError(
                "SMTP credentials over an unencrypted connection need "
                "COMMS_SMTP_INSECURE_CLEARTEXT_AUTH=true (a local mail catcher only)"
            )
        self.insecure_cleartext_auth = insecure_cleartext_auth
        self.host = host
        self.port = port
        self.security = security
        self.username = username
        self._password = password
        self.timeout = timeout
        self.ca_file = ca_file
        self.local_hostname = local_hostname

    def send(
        self,
        messages: Iterable[OutgoingMessage],
        before_handover: Callable[[], None] = _go_ahead,
        before_close: Callable[[], None] = _go_ahead,
    ) -> Iterator[SendResult]:
        connection: smtplib.SMTP | None = None
        # Once a (re)connect failed, the rest of the batch fails with its reason instead
        # of hammering a relay that is down.
        connect_error: str | None = None
        try:
            built = _BuiltAhead(messages)
            while (item := built.take()) is not None:
                message, mime = item
                if isinstance(mime, ValueError):
                    yield _failure(message, mime)
                    continue
                if connect_error is not None:
                    yield SendResult(message.email_id, False, temporary=True, error=connect_error)
                    continue
                if connection is None:
                    # Not reaching the relay says nothing about the message: temporary,
                    # whatever the reason (down, misconfigured, untrusted, bad password).
                    try:
                        connection = self._connect()
                    except (OSError, ValueError) as exc:
                        connect_error = self._connect_failure(exc)
                        yield SendResult(
                            message.email_id, False, temporary=True, error=connect_error
                        )
                        continue
                try:
                    result, connection_usable = self._send_one(
                        connection, message, mime, before_handover, built.build_next
                    )
                except BaseException:
                    # Stopped in the middle of DATA: a QUIT now would be read as part of
                    # the message. Closing makes the server drop it (it waits for the
                    # rest meanwhile).
                    _settled_on_the_way_out(before_close)
                    connection.close()
                    connection = None
                    raise
                if not connection_usable:
                    connection.close()
                    connection = None
                yield result
        except BaseException:
            if connection is not None:
                _settled_on_the_way_out(before_close)
                self._quit(connection)
            raise
        if connection is not None:
            try:
                before_close()
            finally:
                self._quit(connection)

    def _send_one(
        self,
        connection: smtplib.SMTP,
        message: OutgoingMessage,
        mime: bytes,
        before_handover: Callable[[], None],
        meanwhile: Callable[[], None],
    ) -> tuple[SendResult, bool]:
        """The result, and whether the connection can carry the next message."""
        try:
            # The envelope comes from the message's fields, never parsed from headers.
            transmit(
                connection,
                ascii_address(message.envelope_sender or message.sender_email),
                ascii_address(message.recipient_email),
                mime,
                before_handover,
                meanwhile,
            )
        except (
            smtplib.SMTPRecipientsRefused,
            smtplib.SMTPResponseException,
            smtplib.SMTPNotSupportedError,
        ) as exc:
            # A refusal of this message only; smtplib has already sent RSET (ignoring
            # its errors) unless the server closed the connection (421).
            log.info("email %s not accepted: %s", message.email_id, classify(exc)[1])
            return _failure(message, exc), connection.sock is not None
        except (OSError, ValueError) as exc:
            # Disconnects, timeouts, resets: the next message reconnects.
            log.info("email %s not sent: %s", message.email_id, classify(exc)[1])
            return _failure(message, exc), False
        return SendResult(message.email_id, delivered=True), True

    def _connect(self) -> smtplib.SMTP:
        connection: smtplib.SMTP
        if self.security == "tls":
            connection = smtplib.SMTP_SSL(
                self.host,
                self.port,
                local_hostname=self.local_hostname,
                timeout=self.timeout,
                context=self._tls_context(),
            )
        else:
            connection = smtplib.SMTP(
                self.host, self.port, local_hostname=self.local_hostname, timeout=self.timeout
            )
        try:
            # The last line of a message goes out as a segment of its own (after
            # before_handover): without this, Nagle's algorithm holds it until the server's
            # delayed ACK of the body, ~40 ms a message.
            if connection.sock is not None:
                connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.ehlo_or_helo_if_needed()
            if self.security == "starttls":
                if not connection.has_extn("starttls"):
                    raise StartTlsUnavailableError(
                        f"{self.host}:{self.port} does not offer STARTTLS; not sending in clear"
                    )
                connection.starttls(context=self._tls_context())
                connection.ehlo()
            if self.username:
                # Read at every connect, so that a rotated password needs no restart.
                login(connection, self.username, self._password() or "")
        except BaseException:
            connection.close()
            raise
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        # Verification and hostname checking stay on; a private CA is added, not a bypass.
        return ssl.create_default_context(cafile=self.ca_file)

    def _connect_failure(self, exc: BaseException) -> str:
        _, reason = classify(exc)
        password = self._password_for_redaction()
        if password:
            reason = reason.replace(password, "***")
        reason = _one_line(f"cannot connect to {self.host}:{self.port}: {reason}")
        log.warning("SMTP %s", reason)
        return reason

    def _password_for_redaction(self) -> str | None:
        try:
            return self._password()
        except (OSError, ValueError):
            return None

    @staticmethod
    def _quit(connection: smtplib.SMTP) -> None:
        try:
            connection.quit()
        except OSError:
            # Everything was sent already; a failing goodbye changes nothing.
            connection.close()


def _settled_on_the_way_out(before_close: Callable[[], None]) -> None:
    """``before_close`` while an exception is on its way out: what it raises is dropped
    (the exception on its way says why the run stops; the task reads a failed recording
    from its recorder)."""
    with contextlib.suppress(Exception):
        before_close()


def sender_from_settings(settings: Settings) -> Sender:
    """The configured backend: an SMTP relay, or ``.eml`` files under the var folder."""
    from comms_tasks.mail.file_sender import FileSender  # it builds on this module

    if settings.mail_backend == "smtp":
        return SmtpSender(
            host=settings.smtp_host,
            port=settings.smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=settings.smtp_password_value,
            timeout=settings.smtp_timeout,
            ca_file=settings.smtp_ca_file,
            insecure_cleartext_auth=settings.smtp_insecure_cleartext_auth,
        )
    return FileSender(settings.outbox_folder)
