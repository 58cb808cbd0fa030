"""MIME building, error classification, and both senders against real servers on loopback."""

from __future__ import annotations

import dataclasses
import datetime as dt
import email
import email.message
import email.policy
import itertools
import logging
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comms_tasks.mail.file_sender import FileSender
from comms_tasks.mail.message import OutgoingMessage, build_mime, new_message_id
from comms_tasks.mail.sender import (
    MAX_ERROR_LENGTH,
    SendResult,
    SmtpSender,
    StartTlsUnavailableError,
    classify,
    sender_from_settings,
)
from comms_tasks.settings import Settings
from tests import smtp as smtp_servers
from tests.conftest import free_port
from tests.smtp import SilentServer, SmtpSink, make_certificates, server_tls_context

# The shared fixtures of tests/smtp.py.
silent_server = smtp_servers.silent_server

pytestmark = pytest.mark.filterwarnings(
    # aiosmtpd itself touches its deprecated attribute after every successful AUTH.
    "ignore:Session.login_data is deprecated:DeprecationWarning"
)

SENDER = "anfragen@therapievermittlung.example"
SENDER_NAME = "Therapievermittlung Süd"
RECIPIENT = "praxis.mueller@example.org"
RECIPIENT_NAME = "Dr. Jörg Müller-Lüdenscheidt"
SUBJECT = "Anfrage für einen Therapieplatz \N{EN DASH} Grüße aus Köln"
BODY_TEXT = "Sehr geehrter Herr Dr. Müller,\n\nÄrger? Übermäßig! ß€\n.\nEine Zeile mit Punkt.\n"
BODY_HTML = "<p>Sehr geehrter Herr Dr. Müller,</p>\n<p>&lt;b&gt;Ärger&lt;/b&gt; &amp; Grüße</p>\n"
USER = "relay-user"
PASSWORD = "s3cr3t-Pässwort"
CLIENT_TIMEOUT = 2.0

_email_ids = itertools.count(1)


def outgoing(**changes: Any) -> OutgoingMessage:
    message = OutgoingMessage(
        email_id=next(_email_ids),
        therapist_id=1,
        message_id=new_message_id(SENDER),
        sender_email=SENDER,
        sender_name=SENDER_NAME,
        recipient_email=RECIPIENT,
        recipient_name=RECIPIENT_NAME,
        reply_to=None,
        subject=SUBJECT,
        body_text=BODY_TEXT,
        body_html=BODY_HTML,
        date=dt.datetime(2025, 3, 30, 9, 15, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    )
    return dataclasses.replace(message, **changes)


def parse(raw: bytes) -> email.message.EmailMessage:
    return cast(
        email.message.EmailMessage, email.message_from_bytes(raw, policy=email.policy.default)
    )


def text_of(part: email.message.MIMEPart) -> str:
    # Line ends travel as CRLF; compare the text, not the line-end convention.
    return cast(str, part.get_content()).replace("\r\n", "\n")


def smtp_sender(
    sink: SmtpSink | SilentServer | None = None,
    *,
    security: Literal["none", "starttls", "tls"] = "none",
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    password: str | None = None,
    timeout: float = CLIENT_TIMEOUT,
    ca_file: Path | None = None,
) -> SmtpSender:
    return SmtpSender(
        host=host or (sink.host if sink else "127.0.0.1"),
        port=port or (sink.port if sink else free_port()),
        security=security,
        username=username,
        password=lambda: password,
        timeout=timeout,
        ca_file=ca_file,
        local_hostname="localhost",
    )


@contextmanager
def running(sink: SmtpSink) -> Iterator[SmtpSink]:
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server_context(certificates: tuple[Path, Path, Path]) -> ssl.SSLContext:
    _, server_cert, server_key = certificates
    return server_tls_context(server_cert, server_key)


@pytest.fixture
def ca_file(certificates: tuple[Path, Path, Path]) -> Path:
    return certificates[0]


# --- build_mime ----------------------------------------------------------------------


def test_mime_round_trip_keeps_parts_names_and_text_exact() -> None:
    message = outgoing(reply_to="antworten@therapievermittlung.example")

    parsed = parse(build_mime(message))

    assert parsed.get_content_type() == "multipart/alternative"
    assert parsed["MIME-Version"] == "1.0"
    plain, html = parsed.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert html.get_content_type() == "text/html"
    for part in (plain, html):
        assert part.get_content_charset() == "utf-8"
        assert part["MIME-Version"] is None
    assert text_of(plain) == BODY_TEXT
    assert text_of(html) == BODY_HTML  # escaping is the renderer's job, kept untouched
    assert parsed["Subject"] == SUBJECT
    sender = parsed["From"].addresses[0]
    assert (sender.display_name, sender.addr_spec) == (SENDER_NAME, SENDER)
    recipient = parsed["To"].addresses[0]
    assert (recipient.display_name, recipient.addr_spec) == (RECIPIENT_NAME, RECIPIENT)
    assert parsed["Reply-To"].addresses[0].addr_spec == "antworten@therapievermittlung.example"
    assert parsed["Message-ID"] == message.message_id
    assert parsed["Date"].datetime == message.date
    assert parsed["In-Reply-To"] is None
    assert parsed["References"] is None
    assert parsed["Auto-Submitted"] is None


def test_mime_is_seven_bit_with_crlf_and_encoded_headers() -> None:
    raw = build_mime(outgoing(body_text="x" * 300 + "\nÄ\n"))

    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    assert b"=?utf-8?" in raw  # RFC 2047 for the umlauts in names and subject


_BODY_TEXT = st.lists(
    st.one_of(
        st.sampled_from([" ", "\t", "\n", "\r\n", "\r", ".", "=", "-", "From ", "--", "=_"]),
        st.text(max_size=90),
    ),
    max_size=40,
).map("".join)


# Any subject the builder accepts: control and line-separator characters are refused on
# purpose (test_line_breaks_in_header_values_are_refused).
_SUBJECT = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=120
)


@settings(max_examples=200, deadline=None)
@given(text=_BODY_TEXT, html=_BODY_TEXT, subject=_SUBJECT)
def test_any_body_and_subject_survive_the_wire_exactly(text: str, html: str, subject: str) -> None:
    """Whatever the bodies hold (dots, '=', 'From ', trailing spaces, bare CRs, any
    character), the wire form is 7-bit with short CRLF lines, parses without defects,
    and gives the same texts back."""
    raw = build_mime(outgoing(body_text=text, body_html=html, subject=subject))
    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    parsed = parse(raw)
    assert parsed.defects == []
    plain, rich = parsed.iter_parts()
    assert plain.defects == [] and rich.defects == []
    # Every line end (CRLF, LF, a lone CR) travels as CRLF.
    assert text_of(plain) == re.sub(r"\r\n?", "\n", text)
    assert text_of(rich) == re.sub(r"\r\n?", "\n", html)
    assert str(parsed["Subject"]) == subject


def test_reply_to_only_when_set_and_threading_headers_for_follow_ups() -> None:
    original = new_message_id(SENDER)
    earlier = new_message_id(SENDER)

    parsed = parse(build_mime(outgoing(in_reply_to=original, references=(earlier, original))))

    assert parsed["Reply-To"] is None
    assert parsed["In-Reply-To"] == original
    assert parsed["References"].split() == [earlier, original]


def test_new_message_id_is_unique_in_the_sender_domain() -> None:
    first, second = new_message_id(SENDER), new_message_id(SENDER)

    assert first != second
    assert first.startswith("<") and first.endswith("@therapievermittlung.example>")
    assert len(first.split("@")[0]) == 1 + 32


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", "Anfrage\r\nBcc: victim@example.org"),
        ("subject", "Anfrage\nBcc: victim@example.org"),
        ("sender_name", "Therapievermittlung\r\nBcc: victim@example.org"),
        ("recipient_name", "Dr. Müller\nBcc: victim@example.org"),
        ("recipient_email", "praxis@example.org\r\nBcc: victim@example.org"),
        ("sender_email", "anfragen@example.org\nBcc: victim@example.org"),
        ("reply_to", "antworten@example.org\rBcc: victim@example.org"),
        ("message_id", "<abc@example.org>\r\nBcc: victim@example.org"),
        ("in_reply_to", "<abc@example.org>\nBcc: victim@example.org"),
        ("references", ("<abc@example.org>\r\nBcc: victim@example.org",)),
    ],
)
def test_line_breaks_in_header_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        build_mime(outgoing(**{field: value}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("recipient_email", "not an address"),
        ("message_id", "no-angle-brackets@example.org"),
        ("date", dt.datetime(2025, 3, 30, 9, 15)),
    ],
)
def test_malformed_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        build_mime(outgoing(**{field: value}))


# --- classify --------------------------------------------------------------------------

LONG_TEXT = "5.7.1 " + "blocked " * 300


@pytest.mark.parametrize(
    ("exc", "temporary", "expected"),
    [
        (
            smtplib.SMTPResponseException(451, b"4.3.0 Try again later"),
            True,
            "451 4.3.0 Try again later",
        ),
        (smtplib.SMTPDataError(452, b"4.3.1 Insufficient storage"), True, "452 4.3.1"),
        (
            smtplib.SMTPDataError(550, b"5.1.1 mailbox unavailable"),
            False,
            "550 5.1.1 mailbox unavailable",
        ),
        (
            smtplib.SMTPDataError(554, b"5.7.1 line one\nline two"),
            False,
            "554 5.7.1 line one line two",
        ),
        (smtplib.SMTPSenderRefused(451, b"4.7.1 greylisted", SENDER), True, "451 4.7.1 greylisted"),
        (
            smtplib.SMTPSenderRefused(553, b"5.7.1 not allowed", SENDER),
            False,
            "553 5.7.1 not allowed",
        ),
        (
            smtplib.SMTPRecipientsRefused({RECIPIENT: (550, b"5.1.1 no such user")}),
            False,
            "550 5.1.1 no such user",
        ),
        (smtplib.SMTPRecipientsRefused({RECIPIENT: (450, b"4.2.1 busy")}), True, "450 4.2.1 busy"),
        (
            smtplib.SMTPRecipientsRefused(
                {"a@x.example": (450, b"busy"), "b@x.example": (550, b"gone")}
            ),
            False,
            "550 gone",
        ),
        (smtplib.SMTPConnectError(421, b"4.3.2 too many connections"), True, "421 4.3.2"),
        (smtplib.SMTPServerDisconnected("Connection unexpectedly closed"), True, "connection lost"),
        (
            smtplib.SMTPAuthenticationError(535, b"5.7.8 credentials invalid"),
            True,
            "authentication failed: 535",
        ),
        (smtplib.SMTPNotSupportedError("SMTPUTF8 not supported"), False, "not supported"),
        (StartTlsUnavailableError("no STARTTLS"), True, "STARTTLS unavailable"),
        (ConnectionRefusedError(111, "Connection refused"), True, "Connection refused"),
        (ConnectionResetError(104, "Connection reset by peer"), True, "reset"),
        (socket.timeout("timed out"), True, "timed out"),  # noqa: UP041
        (TimeoutError(), True, "timed out"),
        (socket.gaierror(-2, "Name or service not known"), True, "Name or service not known"),
        (OSError(113, "No route to host"), True, "No route to host"),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), True, "certificate"),
        (ValueError("subject must not contain line breaks"), False, "invalid message: subject"),
        (smtplib.SMTPDataError(550, LONG_TEXT.encode()), False, "550 5.7.1 blocked"),
    ],
)
def test_classify(exc: BaseException, temporary: bool, expected: str) -> None:
    classified_temporary, reason = classify(exc)

    assert classified_temporary is temporary
    assert expected in reason
    assert "\n" not in reason and "\r" not in reason
    assert len(reason) <= MAX_ERROR_LENGTH


# --- SmtpSender against a real server -------------------------------------------------


def test_batch_goes_over_one_connection_and_each_message_once(smtp_sink: SmtpSink) -> None:
    messages = [outgoing() for _ in range(3)]

    results = list(smtp_sender(smtp_sink).send(messages))

    assert results == [SendResult(m.email_id, delivered=True) for m in messages]
    assert smtp_sink.connections == 1
    assert smtp_sink.quits == 1
    assert smtp_sink.message_ids() == {m.message_id: 1 for m in messages}
    assert smtp_sink.envelopes == [(SENDER, [RECIPIENT])] * 3
    received = smtp_sink.accepted[0]
    assert received["Subject"] == SUBJECT
    assert text_of(received.get_body(("plain",))) == BODY_TEXT  # type: ignore[arg-type]


def test_envelope_comes_from_the_fields_not_the_headers(smtp_sink: SmtpSink) -> None:
    message = outgoing(reply_to="antworten@therapievermittlung.example")

    list(smtp_sender(smtp_sink).send([message]))

    assert smtp_sink.envelopes == [(SENDER, [RECIPIENT])]


def test_internationalised_domain_goes_out_in_ascii(smtp_sink: SmtpSink) -> None:
    expected = "praxis@" + "müller-therapie.de".encode("idna").decode("ascii")

    [result] = smtp_sender(smtp_sink).send([outgoing(recipient_email="praxis@müller-therapie.de")])

    assert result.delivered
    assert smtp_sink.envelopes == [(SENDER, [expected])]
    assert smtp_sink.accepted[0]["To"].addresses[0].addr_spec == expected


def test_results_are_yielded_as_each_send_returns(smtp_sink: SmtpSink) -> None:
    first, second = outgoing(), outgoing()
    results = smtp_sender(smtp_sink).send([first, second])

    assert next(results).delivered
    assert smtp_sink.message_ids() == {first.message_id: 1}
    assert next(results).delivered
    assert smtp_sink.message_ids() == {first.message_id: 1, second.message_id: 1}


def test_stopping_early_still_says_goodbye(smtp_sink: SmtpSink) -> None:
    for result in smtp_sender(smtp_sink).send([outgoing(), outgoing()]):
        assert result.delivered
        break  # the generator is closed as the loop lets go of it

    assert smtp_sink.quits == 1
    assert len(smtp_sink.accepted) == 1


def test_4xx_is_temporary_and_the_next_message_uses_the_same_connection(
    smtp_sink: SmtpSink,
) -> None:
    smtp_sink.script("451 4.3.0 Try again later")
    deferred, following = outgoing(), outgoing()

    first, second = smtp_sender(smtp_sink).send([deferred, following])

    assert first == SendResult(
        deferred.email_id, delivered=False, temporary=True, error="451 4.3.0 Try again later"
    )
    assert second.delivered
    assert smtp_sink.connections == 1
    assert smtp_sink.message_ids() == {following.message_id: 1}


def test_5xx_is_permanent_with_the_servers_reply(smtp_sink: SmtpSink) -> None:
    smtp_sink.script("550 5.7.1 Message rejected as spam")

    rejected, following = smtp_sender(smtp_sink).send([outgoing(), outgoing()])

    assert not rejected.delivered
    assert not rejected.temporary
    assert rejected.error is not None
    assert "550" in rejected.error and "Message rejected as spam" in rejected.error
    assert following.delivered
    assert smtp_sink.connections == 1


def test_refused_recipient_is_permanent(smtp_sink: SmtpSink) -> None:
    smtp_sink.refuse_recipient("gone@example.org")

    refused, following = smtp_sender(smtp_sink).send(
        [outgoing(recipient_email="gone@example.org"), outgoing()]
    )

    assert not refused.delivered and not refused.temporary
    assert refused.error is not None and "550 5.1.1 mailbox unavailable" in refused.error
    assert following.delivered
    assert smtp_sink.connections == 1


def test_invalid_message_fails_alone_and_permanently(smtp_sink: SmtpSink) -> None:
    broken = outgoing(subject="Anfrage\r\nBcc: victim@example.org")

    invalid, following = smtp_sender(smtp_sink).send([broken, outgoing()])

    assert not invalid.delivered and not invalid.temporary
    assert invalid.error is not None and "subject" in invalid.error
    assert following.delivered
    assert len(smtp_sink.accepted) == 1


def test_a_message_built_ahead_that_cannot_be_built_fails_in_its_place(
    smtp_sink: SmtpSink,
) -> None:
    """The next message is built while the server reads the one before; one that cannot
    be built still comes back in its place, and the rest go on the same connection."""
    first, broken, last = outgoing(), outgoing(subject="Anfrage\r\nBcc: x@example.org"), outgoing()

    results = list(smtp_sender(smtp_sink).send([first, broken, last]))

    assert [r.email_id for r in results] == [first.email_id, broken.email_id, last.email_id]
    assert [r.delivered for r in results] == [True, False, True]
    assert results[1].error is not None and "subject" in results[1].error
    assert smtp_sink.message_ids() == {first.message_id: 1, last.message_id: 1}
    assert smtp_sink.connections == 1


class Interrupted(BaseException):
    """As the soft time limit: raised into the sending thread, not a failure of a message."""


def test_an_interruption_while_the_next_is_built_comes_after_the_result_before(
    smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Struck while the next message is built, after a message's last line went out: that
    message's reply is read and its result handed on first (to be recorded, not sent
    again), then the interruption is raised and the connection is quit, nothing more
    sent."""
    from comms_tasks.mail import sender as sender_module

    first, second, third = outgoing(), outgoing(), outgoing()

    def build(message: OutgoingMessage) -> bytes:
        if message is second:
            raise Interrupted
        return build_mime(message)

    monkeypatch.setattr(sender_module, "build_mime", build)
    results = []
    with pytest.raises(Interrupted):
        for result in smtp_sender(smtp_sink).send([first, second, third]):
            results.append(result)

    assert results == [SendResult(first.email_id, delivered=True)]
    assert smtp_sink.message_ids() == {first.message_id: 1}
    assert smtp_sink.quits == 1


def test_dropped_connection_is_temporary_and_the_next_message_reconnects(
    smtp_sink: SmtpSink,
) -> None:
    smtp_sink.script("drop")
    following = outgoing()

    dropped, delivered = smtp_sender(smtp_sink).send([outgoing(), following])

    assert not dropped.delivered and dropped.temporary
    assert delivered.delivered
    assert smtp_sink.connections == 2
    assert smtp_sink.message_ids() == {following.message_id: 1}


def test_hanging_server_times_out_as_temporary(smtp_sink: SmtpSink) -> None:
    smtp_sink.script("hang")
    started = time.monotonic()

    hung, following = smtp_sender(smtp_sink, timeout=1).send([outgoing(), outgoing()])

    assert time.monotonic() - started < 5
    assert not hung.delivered and hung.temporary
    assert hung.error is not None and "timed out" in hung.error
    assert following.delivered


def test_failed_reconnect_fails_the_rest_of_the_batch_without_more_attempts() -> None:
    sink = SmtpSink()
    sink.start()
    sink.script("drop")
    results = smtp_sender(sink).send([outgoing() for _ in range(4)])

    dropped = next(results)
    sink.stop()  # the reconnect for the next message is refused
    rest = list(results)

    assert dropped.temporary
    assert all(not r.delivered and r.temporary for r in rest)
    assert len({r.error for r in rest}) == 1
    assert rest[0].error is not None and "Connection refused" in rest[0].error


def test_silent_server_is_temporary_and_tried_once_per_batch(silent_server: SilentServer) -> None:
    started = time.monotonic()

    results = list(smtp_sender(silent_server, timeout=0.5).send([outgoing() for _ in range(3)]))

    assert time.monotonic() - started < 1.4
    assert all(not r.delivered and r.temporary for r in results)
    assert results[0].error is not None and "timed out" in results[0].error
    silent_server.stop()
    assert silent_server.connections == 1


def test_connection_refused_fails_every_message_as_temporary() -> None:
    messages = [outgoing() for _ in range(3)]

    results = list(smtp_sender(port=free_port()).send(messages))

    assert [r.email_id for r in results] == [m.email_id for m in messages]
    assert all(not r.delivered and r.temporary for r in results)
    assert len({r.error for r in results}) == 1
    assert results[0].error is not None and "Connection refused" in results[0].error


def test_empty_batch_opens_no_connection(smtp_sink: SmtpSink) -> None:
    assert list(smtp_sender(smtp_sink).send([])) == []
    assert smtp_sink.connections == 0


# --- TLS and authentication ---------------------------------------------------------


def test_starttls_with_trusted_ca_delivers(server_context: ssl.SSLContext, ca_file: Path) -> None:
    with running(SmtpSink(tls_context=server_context, require_starttls=True)) as sink:
        [result] = smtp_sender(sink, security="starttls", host="localhost", ca_file=ca_file).send(
            [outgoing()]
        )

        assert result.delivered
        assert len(sink.accepted) == 1


def test_starttls_with_untrusted_certificate_sends_nothing(
    server_context: ssl.SSLContext,
) -> None:
    with running(SmtpSink(tls_context=server_context)) as sink:
        results = list(smtp_sender(sink, security="starttls").send([outgoing(), outgoing()]))

        assert all(not r.delivered and r.temporary for r in results)
        assert results[0].error is not None and "certificate" in results[0].error
        assert sink.accepted == []
        assert sink.connections == 1


def test_starttls_not_offered_refuses_to_send_in_clear(smtp_sink: SmtpSink, ca_file: Path) -> None:
    [result] = smtp_sender(smtp_sink, security="starttls", ca_file=ca_file).send([outgoing()])

    assert not result.delivered and result.temporary
    assert result.error is not None and "STARTTLS unavailable" in result.error
    assert smtp_sink.accepted == []


def test_implicit_tls_with_trusted_ca_delivers(
    server_context: ssl.SSLContext, ca_file: Path
) -> None:
    with running(SmtpSink(tls_context=server_context, implicit_tls=True)) as sink:
        results = list(smtp_sender(sink, security="tls", ca_file=ca_file).send([outgoing()] * 2))

        assert all(r.delivered for r in results)
        assert sink.connections == 1


def test_implicit_tls_with_untrusted_certificate_sends_nothing(
    server_context: ssl.SSLContext,
) -> None:
    with running(SmtpSink(tls_context=server_context, implicit_tls=True)) as sink:
        [result] = smtp_sender(sink, security="tls").send([outgoing()])

        assert not result.delivered and result.temporary
        assert result.error is not None and "certificate" in result.error
        assert sink.accepted == []


def test_authentication_over_tls_delivers(server_context: ssl.SSLContext, ca_file: Path) -> None:
    sink = SmtpSink(tls_context=server_context, require_starttls=True, auth=(USER, PASSWORD))
    with running(sink):
        [result] = smtp_sender(
            sink, security="starttls", username=USER, password=PASSWORD, ca_file=ca_file
        ).send([outgoing()])

        assert result.delivered
        assert len(sink.accepted) == 1


def test_wrong_password_is_temporary_and_never_shown(
    server_context: ssl.SSLContext, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wr0ng-Pässwort"
    sink = SmtpSink(tls_context=server_context, implicit_tls=True, auth=(USER, PASSWORD))
    caplog.set_level(logging.DEBUG)
    with running(sink):
        results = list(
            smtp_sender(sink, security="tls", username=USER, password=wrong, ca_file=ca_file).send(
                [outgoing(), outgoing()]
            )
        )

        assert all(not r.delivered and r.temporary for r in results)
        assert results[0].error is not None and "authentication failed" in results[0].error
        assert all(wrong not in (r.error or "") for r in results)
        assert wrong not in caplog.text
        assert sink.accepted == []
        assert sink.connections == 1


def test_password_is_read_at_connect_time(server_context: ssl.SSLContext, ca_file: Path) -> None:
    current = {"password": "old-password"}
    sink = SmtpSink(tls_context=server_context, implicit_tls=True, auth=(USER, PASSWORD))
    with running(sink):
        sender = SmtpSender(
            host=sink.host,
            port=sink.port,
            security="tls",
            username=USER,
            password=lambda: current["password"],
            timeout=CLIENT_TIMEOUT,
            ca_file=ca_file,
            local_hostname="localhost",
        )
        [before] = sender.send([outgoing()])
        current["password"] = PASSWORD
        [after] = sender.send([outgoing()])

        assert not before.delivered
        assert after.delivered


# --- FileSender ----------------------------------------------------------------------


def test_file_sender_writes_parseable_eml_files_into_a_new_folder(tmp_path: Path) -> None:
    folder = tmp_path / "var" / "outbox"
    messages = [outgoing(), outgoing()]

    results = list(FileSender(folder).send(messages))

    assert results == [SendResult(m.email_id, delivered=True) for m in messages]
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == sorted(FileSender(folder).path_for(m).name for m in messages)
    for path, message in zip(files, messages, strict=True):
        assert path.name.startswith(f"{message.email_id:08d}-")
        assert path.suffix == ".eml"
        parsed = parse(path.read_bytes())
        assert parsed["Message-ID"] == message.message_id
        assert parsed["Subject"] == SUBJECT


def test_file_sender_rerun_overwrites_the_same_file(tmp_path: Path) -> None:
    message = outgoing()
    sender = FileSender(tmp_path)

    list(sender.send([message]))
    list(sender.send([dataclasses.replace(message, subject="Zweiter Versuch")]))

    [path] = tmp_path.iterdir()
    assert parse(path.read_bytes())["Subject"] == "Zweiter Versuch"


def test_file_sender_failure_is_temporary(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("", encoding="utf-8")

    [result] = FileSender(blocked).send([outgoing()])

    assert not result.delivered and result.temporary
    assert result.error


# --- configuration -------------------------------------------------------------------


def test_sender_from_settings(tmp_path: Path) -> None:
    file_sender = sender_from_settings(Settings(mail_backend="file", var_dir=tmp_path))
    smtp = sender_from_settings(
        Settings(
            mail_backend="smtp",
            smtp_host="relay.example.org",
            smtp_port=465,
            smtp_security="tls",
            smtp_username=USER,
            smtp_password=PASSWORD,
            smtp_timeout=12,
        )
    )

    assert isinstance(file_sender, FileSender)
    assert file_sender.folder == tmp_path / "outbox"
    assert isinstance(smtp, SmtpSender)
    assert (smtp.host, smtp.port, smtp.security, smtp.username, smtp.timeout) == (
        "relay.example.org",
        465,
        "tls",
        USER,
        12,
    )
    assert PASSWORD not in repr(vars(smtp))


# --- credentials never travel in clear unless told so ---------------------------------


def test_credentials_without_tls_are_refused_before_connecting() -> None:
    with running(SmtpSink(auth=(USER, PASSWORD), cleartext_auth=True)) as sink:
        with pytest.raises(ValueError, match="COMMS_SMTP_INSECURE_CLEARTEXT_AUTH"):
            smtp_sender(sink, security="none", username=USER, password=PASSWORD)

        assert sink.connections == 0


def test_credentials_without_tls_go_to_a_local_catcher_with_the_opt_in() -> None:
    with running(SmtpSink(auth=(USER, PASSWORD), cleartext_auth=True)) as sink:
        sender = SmtpSender(
            host=sink.host,
            port=sink.port,
            security="none",
            username=USER,
            password=lambda: PASSWORD,
            timeout=CLIENT_TIMEOUT,
            local_hostname="localhost",
            insecure_cleartext_auth=True,
        )
        [result] = sender.send([outgoing()])

        assert result.delivered, result.error
        assert len(sink.accepted) == 1
