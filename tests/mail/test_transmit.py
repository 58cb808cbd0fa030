"""The hand-written transaction of ``conversation.transmit`` against ``smtplib.SMTP.sendmail``.

Both run against one aiosmtpd server that records each transaction's MAIL options and raw
content: the same dot-stuffing and line endings, and the same MAIL command (``SIZE=<n>``
when the server offers SIZE, RFC 1870, so that a relay with a limit refuses a message too
big before its body crosses).
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given
from hypothesis import strategies as st

from comms_tasks.mail import conversation

CASES = [
    b"Subject: a\r\n\r\n.line starting with a dot\r\n..two\r\n.\r\nend\r\n",
    b"Subject: b\r\n\r\nno final CRLF",
    b"Subject: c\r\n\r\nbare\nLF\n.dot after bare LF\r\n",
    b"Subject: d\r\n\r\nbare\rCR\r.dot after bare CR\r\n",
    "Subject: e\r\n\r\n8-bit: Grüße, Therapieplätze\r\n".encode(),
    b".\r\n",
]


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.seen.append((list(envelope.mail_options), bytes(envelope.original_content or b"")))
        return "250 OK"


@pytest.fixture
def server() -> Iterator[tuple[Recorder, int]]:
    recorder = Recorder()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield recorder, port
    finally:
        controller.stop()


def both(port: int, content: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as connection:
        connection.sendmail("a@example.org", ["b@example.org"], content)
        conversation.transmit(connection, "a@example.org", "b@example.org", content, lambda: None)


@pytest.mark.parametrize("content", CASES)
def test_same_bytes_on_the_wire(server: tuple[Recorder, int], content: bytes) -> None:
    recorder, port = server
    both(port, content)
    [(_, by_sendmail), (_, by_transmit)] = recorder.seen
    assert by_transmit == by_sendmail


def test_same_mail_command(server: tuple[Recorder, int]) -> None:
    recorder, port = server
    both(port, CASES[0])
    [(by_sendmail, _), (by_transmit, _)] = recorder.seen
    assert by_transmit == by_sendmail, (
        f"sendmail's MAIL options {by_sendmail}, _transmit's {by_transmit}"
    )


@given(
    st.lists(st.sampled_from([b".", b"\r", b"\n", b"a", b"\r\n", b"..", b"\xc3\xbc"])).map(b"".join)
)
def test_dots_doubled_as_smtplib_doubles_them(content: bytes) -> None:
    assert conversation.stuffed(content) == smtplib._quote_periods(content)  # type: ignore[attr-defined]
