"""The SMTP conversation of one message (``smtplib.SMTP.sendmail`` for one recipient,
the last line of DATA waiting for the caller's hand-over) and the login (UTF-8
credentials by AUTH PLAIN), for :class:`comms_tasks.mail.sender.SmtpSender`."""

from __future__ import annotations

import base64
import contextlib
import smtplib
from collections.abc import Callable


def transmit(
    connection: smtplib.SMTP,
    sender: str,
    recipient: str,
    content: bytes,
    before_handover: Callable[[], None],
    meanwhile: Callable[[], None] = lambda: None,
) -> None:
    """``smtplib.SMTP.sendmail`` for one recipient, with ``before_handover`` before the end.

    The envelope, the DATA command and the content go out while the caller records the
    result before (its commit overlaps this message's round trips); only the last line,
    which makes the server accept the message, waits for ``before_handover``. While the
    server reads the message, ``meanwhile`` runs (the caller builds the next one); then
    its reply is read. Refusals raise what ``sendmail`` raises, after a RSET (unless the
    server closed, 421).
    """
    connection.ehlo_or_helo_if_needed()
    # As sendmail: the size declared when the server takes it (RFC 1870), so that a relay
    # with a limit refuses a message too big at MAIL, before its body crosses.
    size = [f"SIZE={len(content)}"] if connection.has_extn("size") else []
    code, reply = connection.mail(sender, size)
    if code != 250:
        reset_after_refusal(connection, code)
        raise smtplib.SMTPSenderRefused(code, reply, sender)
    code, reply = connection.rcpt(recipient)
    if code not in (250, 251):
        reset_after_refusal(connection, code)
        raise smtplib.SMTPRecipientsRefused({recipient: (code, reply)})
    connection.putcmd("data")
    code, reply = connection.getreply()
    if code != 354:
        reset_after_refusal(connection, code)
        raise smtplib.SMTPDataError(code, reply)
    body = stuffed(content)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    connection.send(body)
    before_handover()
    connection.send(b".\r\n")
    meanwhile()
    code, reply = connection.getreply()
    if code != 250:
        reset_after_refusal(connection, code)
        raise smtplib.SMTPDataError(code, reply)


def stuffed(content: bytes) -> bytes:
    """``content`` with a dot doubled at the start of each line (RFC 5321 4.5.2), as
    ``smtplib``'s ``(?m)^\\.`` does: at the very start and after each LF."""
    body = content.replace(b"\n.", b"\n..")
    return b"." + body if body.startswith(b".") else body


def reset_after_refusal(connection: smtplib.SMTP, code: int) -> None:
    """After a refusal, as ``sendmail`` does: RSET, or close when the server said 421."""
    if code == 421:
        connection.close()
        return
    with contextlib.suppress(smtplib.SMTPServerDisconnected):
        connection.rset()


def login(connection: smtplib.SMTP, username: str, password: str) -> None:
    if (username + password).isascii():
        connection.login(username, password)
        return
    # smtplib encodes credentials as ASCII (and its error would show a character of the
    # password); AUTH PLAIN carries UTF-8 (RFC 4616), so send that ourselves.
    if "PLAIN" not in connection.esmtp_features.get("auth", "").upper().split():
        raise smtplib.SMTPException("non-ASCII credentials need AUTH PLAIN, not offered")
    token = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
    code, reply = connection.docmd("AUTH", f"PLAIN {token}")
    if code not in (235, 503):  # 503: already authenticated
        raise smtplib.SMTPAuthenticationError(code, reply)
