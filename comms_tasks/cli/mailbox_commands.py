"""``comms mailbox ...``: what came back to the mailbox, for operators (never the worker).

Bodies and reply texts are health data: masked unless ``show --reveal``. Every other
value is a stranger's header, shown as written by the escaping console of ``comms``.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy.orm import Session

from comms_tasks.cli.shared import MASK, JsonOption, console, database, emit_json, fail
from comms_tasks.local_time import local_iso, local_text
from comms_tasks.models import Email, InboundMail, InboundMailKind, InboundMailState
from comms_tasks.task_names import SCHEDULE_CALLS

mailbox_app = typer.Typer(
    help="Replies, automatic answers and bounces read from the mailbox.", no_args_is_help=True
)
LIST_LIMIT = 200


def summary(mail: InboundMail) -> dict[str, Any]:
    return {
        "id": mail.id,
        "received_at": local_iso(mail.received_at),
        "kind": mail.kind.value,
        "state": mail.state.value,
        "email_id": mail.email_id,
        "match": mail.match_method,
        "to_review": mail.to_review,
        "review_reason": mail.review_reason,
        "sender": mail.sender,
        "status_code": mail.status_code,
        "defect": mail.defect,
        "redacted": mail.redacted_at is not None,
    }


@mailbox_app.command("list")
def mailbox_list(
    kind: Annotated[
        InboundMailKind | None, typer.Option("--kind", help="Only messages of this kind.")
    ] = None,
    unmatched: Annotated[
        bool, typer.Option("--unmatched", help="Only those no email was found for.")
    ] = False,
    to_review: Annotated[
        bool, typer.Option("--to-review", help="Only matched ones an operator should check.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """The newest messages read from the mailbox (at most 200)."""
    from comms_tasks.ops import listings

    with database() as session:
        found = listings.inbound_mail(
            session, kind=kind, unmatched=unmatched, to_review=to_review, limit=LIST_LIMIT
        )
        rows = [summary(mail) for mail in found]
    if as_json:
        emit_json(rows)
        return
    table = Table(title="Mailbox")
    for column in ("id", "received", "kind", "state", "email", "match", "sender", "note"):
        table.add_column(column, overflow="fold")
    for row in rows:
        note = row["review_reason"] or row["defect"] or row["status_code"] or ""
        table.add_row(
            str(row["id"]),
            local_text(row["received_at"]),
            row["kind"],
            row["state"] + (" (review)" if row["to_review"] else ""),
            str(row["email_id"] or "-"),
            row["match"] or "-",
            row["sender"] or "-",
            note,
        )
    console.print(table)


@mailbox_app.command("show")
def mailbox_show(
    mail_id: Annotated[int, typer.Argument(help="The message's id (comms mailbox list).")],
    reveal: Annotated[
        bool, typer.Option("--reveal", help="Show the reply text and the raw message.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """One message: what it is, what it matched, and (with --reveal) what it says."""
    with database() as session:
        mail = session.get(InboundMail, mail_id)
        if mail is None:
            raise fail(f"mailbox message {mail_id} does not exist")
        data = summary(mail)
        data["subject"] = mail.subject if reveal else (mail.subject and MASK)
        data["diagnostic"] = mail.diagnostic
        data["auto_reason"] = mail.auto_reason
        data["folder"] = mail.folder
        data["reply_text"] = mail.reply_text if reveal else (mail.reply_text and MASK)
        raw = mail.raw.decode("utf-8", "replace") if mail.raw is not None else None
        data["raw"] = raw if reveal else (raw and MASK)
    if as_json:
        emit_json(data)
        return
    for key, value in data.items():
        if key in ("raw", "reply_text") and value and value != MASK:
            console.print(f"{key}:", highlight=False)
            console.print(value, highlight=False)
        else:
            console.print(f"{key}: {value if value is not None else '-'}", highlight=False)


def _unapplied(session: Session, mail_id: int) -> InboundMail:
    """The message, locked, unless it does not exist or was applied already."""
    mail = session.get(InboundMail, mail_id, with_for_update=True)
    if mail is None:
        raise fail(f"mailbox message {mail_id} does not exist")
    if mail.state is InboundMailState.MATCHED:
        raise fail(f"mailbox message {mail_id} is already matched to email {mail.email_id}")
    return mail


@mailbox_app.command("assign")
def mailbox_assign(
    mail_id: Annotated[int, typer.Argument(help="The message's id.")],
    email_id: Annotated[int, typer.Option("--email", help="The email it answers.")],
    as_json: JsonOption = False,
) -> None:
    """Match a message to the email it answers, and apply it as if the mailbox had."""
    from comms_tasks.mailbox.apply import assign
    from comms_tasks.models.base import utcnow
    from comms_tasks.settings import get_settings

    with database() as session:
        mail = _unapplied(session, mail_id)
        email = session.get(Email, email_id)
        if email is None:
            raise fail(f"email {email_id} does not exist")
        if mail.kind is InboundMailKind.UNRELATED:
            # An operator says it answers this email: it is read as a reply.
            mail.kind = InboundMailKind.REPLY
        call_requested = assign(session, mail, email, utcnow(), get_settings())
        if mail.state is not InboundMailState.MATCHED:
            raise fail(
                f"mailbox message {mail_id} cannot answer email {email_id}: {mail.review_reason}"
            )
        result = summary(mail)
    if call_requested:
        _book_calls()
    if as_json:
        emit_json(result)
    else:
        console.print(f"mailbox message {mail_id} applied to email {email_id} as {result['kind']}")


@mailbox_app.command("ignore")
def mailbox_ignore(
    mail_id: Annotated[int, typer.Argument(help="The message's id.")],
    as_json: JsonOption = False,
) -> None:
    """Mark an unmatched message as needing nothing (it stays, as everything does)."""
    with database() as session:
        mail = _unapplied(session, mail_id)
        mail.state = InboundMailState.IGNORED
        result = summary(mail)
    if as_json:
        emit_json(result)
    else:
        console.print(f"mailbox message {mail_id} ignored")


def _book_calls() -> None:
    """A bounce assigned by hand asks its call now: the booking runs at once if it can."""
    from comms_tasks.cli.shared import send_message

    try:
        send_message(SCHEDULE_CALLS, {})
    except Exception:  # noqa: BLE001 - beat's follow-up check books it later anyway
        console.print("the call is booked at the next follow-up check", highlight=False)
