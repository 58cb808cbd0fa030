"""The demo's mailbox: what came back for the emails of the demo's past (operators only).

Three messages into the embedded Maildir, each answering one of the emails
``demo_history`` records as sent nine days ago: a German reply that quotes our email, an
Outlook out-of-office, and a Postfix bounce for a mistyped address. ``make run`` then
shows what each changed: a response recorded and its call cancelled, the out-of-office
kept, the address flagged and its call booked. They find their emails by the thread
headers (the embedded default has no plus-addressed reply address).
"""

from __future__ import annotations

import datetime as dt
import email
import email.utils
import mailbox
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from comms_tasks.models import Email, InboundMail
from comms_tasks.ops.demo_history import DEDUP_PREFIX
from comms_tasks.settings import Settings

# The demo's own Message-IDs: a second ``comms demo`` finds them and adds nothing.
DEMO_DOMAIN = "demo.praxis.example"


def _answered(sent: Email) -> str:
    """A day after the email left: when the demo's answers came."""
    assert sent.sent_at is not None
    return email.utils.format_datetime(sent.sent_at.replace(microsecond=0) + dt.timedelta(days=1))


def _reply(sent: Email) -> bytes:
    date = sent.sent_at
    assert date is not None
    quoted = "\n".join(f"> {line}" for line in sent.body_text.splitlines()[:12])
    return f"""\
From: {sent.recipient_name} <{sent.recipient_email}>
To: {sent.sender_name} <{sent.reply_to or sent.sender_email}>
Subject: Re: {sent.subject}
Date: {_answered(sent)}
Message-ID: <demo-reply-{sent.id}@{DEMO_DOMAIN}>
In-Reply-To: {sent.message_id}
References: {sent.message_id}
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Guten Tag,

vielen Dank für Ihre Anfrage. Für die erste Patientin hätte ich ab Februar einen Platz
frei, bei der zweiten Anfrage muss ich leider absagen. Rufen Sie mich gern an.

Mit freundlichen Grüßen
{sent.recipient_name}

Am {date:%d.%m.%Y} um {date:%H:%M} schrieb {sent.sender_name}:
{quoted}
""".encode()


def _out_of_office(sent: Email) -> bytes:
    return f"""\
From: {sent.recipient_name} <{sent.recipient_email}>
To: {sent.sender_name} <{sent.reply_to or sent.sender_email}>
Subject: Automatische Antwort: {sent.subject}
Date: {_answered(sent)}
Message-ID: <demo-ooo-{sent.id}@{DEMO_DOMAIN}>
In-Reply-To: {sent.message_id}
Auto-Submitted: auto-replied
X-Auto-Response-Suppress: All
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Vielen Dank für Ihre Nachricht. Ich bin bis einschließlich 15. des Monats nicht in der
Praxis und lese meine E-Mails nach meiner Rückkehr.
""".encode()


def _bounce(sent: Email) -> bytes:
    boundary = f"demo-bounce-{sent.id}"
    return f"""\
From: MAILER-DAEMON@mx.{DEMO_DOMAIN} (Mail Delivery System)
To: {sent.sender_email}
Subject: Undelivered Mail Returned to Sender
Date: {_answered(sent)}
Message-ID: <demo-bounce-{sent.id}@{DEMO_DOMAIN}>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"

--{boundary}
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.{DEMO_DOMAIN}.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<{sent.recipient_email}>: host mail.praxis.example said: 550 5.1.1
    <{sent.recipient_email}>: Recipient address rejected: User unknown

--{boundary}
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.{DEMO_DOMAIN}

Final-Recipient: rfc822; {sent.recipient_email}
Original-Recipient: rfc822;{sent.recipient_email}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <{sent.recipient_email}>: Recipient address
    rejected: User unknown

--{boundary}
Content-Type: text/rfc822-headers

From: {sent.sender_name} <{sent.sender_email}>
To: {sent.recipient_email}
Subject: {sent.subject}
Message-ID: {sent.message_id}

--{boundary}--
""".encode()


KINDS = (_reply, _out_of_office, _bounce)


def drop_demo_mail(session: Session, settings: Settings) -> int:
    """Put the demo's three answers into the Maildir; returns how many were new."""
    if settings.mailbox_backend != "maildir":
        return 0
    history: Sequence[Email] = session.scalars(
        select(Email)
        .where(Email.dedup_key.like(f"{DEDUP_PREFIX}%"))
        .order_by(Email.id)
        .limit(len(KINDS))
    ).all()
    if len(history) < len(KINDS):
        return 0
    known = set(session.scalars(select(InboundMail.message_id)))
    box = mailbox.Maildir(settings.mailbox_folder, create=True)
    present = {str(message.get("Message-ID")) for message in box}
    added = 0
    for build, past in zip(KINDS, history, strict=True):
        raw = build(past)
        message_id = email.message_from_bytes(raw)["Message-ID"]
        if message_id in known or message_id in present:
            continue
        box.add(raw)
        added += 1
    return added
