"""``comms emails``: list, show, retry, cancel, respond, examples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from comms_tasks.cli.shared import (
    USAGE_ERROR,
    JsonOption,
    _field,
    _iso,
    broker,
    console,
    database,
    emit_json,
    fail,
    request_outcomes,
    send_message,
)
from comms_tasks.local_time import local_text
from comms_tasks.settings import get_settings
from comms_tasks.task_names import SEND_EMAIL

emails_app = typer.Typer(help="Emails to therapists.", no_args_is_help=True)


# --- emails --------------------------------------------------------------------------


def _email_summary(email: Any) -> dict[str, Any]:
    return {
        "id": email.id,
        "therapist_id": email.therapist_id,
        "template": email.template.value,
        "status": email.status.value,
        "subject": email.subject,
        "recipient": email.recipient_email,
        "message_id": email.message_id,
        "queued_at": _iso(email.queued_at),
        "next_attempt_at": _iso(email.next_attempt_at),
        "sent_at": _iso(email.sent_at),
        "retry_count": email.retry_count,
        "error_message": email.error_message,
        "response_received": email.response_received,
        "follow_up_required": email.follow_up_required,
    }


@emails_app.command("list")
def emails_list(
    status_filter: Annotated[
        str | None, typer.Option("--status", help="Only this status (queued, sent, ...).")
    ] = None,
    therapist: Annotated[int | None, typer.Option(help="Only to this therapist.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List emails, newest first."""
    from comms_tasks.models import EmailStatus
    from comms_tasks.ops import listings

    status = None
    if status_filter is not None:
        try:
            status = EmailStatus(status_filter)
        except ValueError:
            choices = ", ".join(s.value for s in EmailStatus)
            raise fail(f"--status: must be one of {choices}", code=USAGE_ERROR) from None
    with database() as session:
        found = listings.emails(session, status=status, therapist_id=therapist, limit=limit)
        items = [_email_summary(email) for email in found]
    if as_json:
        emit_json(items)
        return
    table = Table(title="Emails")
    for column in ("id", "therapist", "template", "status", "queued", "sent", "tries", "subject"):
        table.add_column(column, overflow="fold")
    for item in items:
        table.add_row(
            str(item["id"]),
            str(item["therapist_id"]),
            item["template"],
            item["status"],
            local_text(item["queued_at"]),
            local_text(item["sent_at"]),
            str(item["retry_count"]),
            item["subject"],
        )
    console.print(table)


@emails_app.command("show")
def emails_show(
    email_id: Annotated[int, typer.Argument(help="The email's id.")],
    body: Annotated[bool, typer.Option("--body", help="Also print the text body.")] = False,
    as_json: JsonOption = False,
) -> None:
    """One email: headers, state, the requests it asks about (and its body with --body)."""
    from comms_tasks.models import Email

    with database() as session:
        email = session.get(Email, email_id)
        if email is None:
            raise fail(f"email {email_id} does not exist")
        data = _email_summary(email)
        data["requests"] = [
            {
                "placement_request_id": batch.placement_request_id,
                "priority": batch.priority,
                "included": batch.included,
                "response_outcome": batch.response_outcome.value
                if batch.response_outcome
                else None,
            }
            for batch in email.batches
        ]
        if body:
            data["body_text"] = email.body_text
    if as_json:
        emit_json(data)
        return
    for key, value in data.items():
        if key not in ("requests", "body_text"):
            console.print(_field(key, value), highlight=False)
    table = Table(title="Requests")
    for column in ("priority", "request", "included", "outcome"):
        table.add_column(column)
    for item in data["requests"]:
        table.add_row(
            str(item["priority"]),
            str(item["placement_request_id"]),
            "yes" if item["included"] else "withdrawn",
            item["response_outcome"] or "-",
        )
    console.print(table)
    if body:
        console.print(data["body_text"], markup=False, highlight=False)


def _change_email(email_id: int, change: Any, verb: str, as_json: bool) -> None:
    from comms_tasks.models import Email
    from comms_tasks.models.base import utcnow

    with database() as session:
        email = session.get(Email, email_id, with_for_update=True)
        if email is None:
            raise fail(f"email {email_id} does not exist")
        try:
            change(session, email, utcnow())
        except ValueError as exc:
            raise fail(str(exc)) from None
        result = _email_summary(email)
    if as_json:
        emit_json(result)
    else:
        console.print(f"email {email_id} {verb}: now {result['status']}")


@emails_app.command("retry")
def emails_retry(
    email_id: Annotated[int, typer.Argument(help="The email's id.")], as_json: JsonOption = False
) -> None:
    """Queue a failed (or waiting) email for the next send, with a fresh set of attempts."""
    from comms_tasks.emails.delivery import retry_now

    _change_email(email_id, retry_now, "retried", as_json)


@emails_app.command("cancel")
def emails_cancel(
    email_id: Annotated[int, typer.Argument(help="The email's id.")], as_json: JsonOption = False
) -> None:
    """Cancel an email that has not been sent."""
    from comms_tasks.emails.delivery import cancel

    _change_email(
        email_id, lambda session, email, _now: cancel(session, email), "cancelled", as_json
    )


@emails_app.command("respond")
def emails_respond(
    email_id: Annotated[int, typer.Argument(help="The email that was answered.")],
    request: Annotated[
        list[str] | None,
        typer.Option("--request", help="REQUEST_ID=accepted|rejected|needs_follow_up, repeatable."),
    ] = None,
    note: Annotated[str | None, typer.Option("--note", help="What the therapist said.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Record a therapist's answer (by mail, fax or phone) and its outcomes per request.

    The same path as the record_email_response message: the follow-up call is cancelled
    and confirmations of accepted requests are queued. Recorded with source ``operator``.
    """
    import uuid

    from pydantic import ValidationError

    from comms_tasks.contracts import ContractViolation, received
    from comms_tasks.emails.answers import record_response
    from comms_tasks.models.base import utcnow

    outcomes: list[dict[str, Any]] = []
    for request_id, outcome in request_outcomes(request, discussed=False):
        if any(named["placement_request_id"] == request_id for named in outcomes):
            raise fail(f"--request: request {request_id} is named twice", code=USAGE_ERROR)
        outcomes.append({"placement_request_id": request_id, "outcome": outcome, "notes": None})
    now = utcnow()
    try:
        command = received.RecordEmailResponse.model_validate(
            {
                "command_id": str(uuid.uuid4()),
                "email_id": email_id,
                "received_at": now,
                "content": note,
                "outcomes": outcomes,
            }
        )
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]).replace("outcomes", "--request")
        raise fail(f"{where or 'answer'}: {first['msg']}", code=USAGE_ERROR) from None
    with database() as session:
        try:
            confirmations = record_response(session, command, now, get_settings(), "operator")
        except ContractViolation as exc:
            reason = exc.reason.removeprefix("command.").replace("outcomes", "--request")
            raise fail(reason) from None
    if confirmations:
        try:
            with broker() as producer:
                send_message(SEND_EMAIL, {}, producer=producer)
        except typer.Exit:
            console.print("confirmations go out with the next send (every minute)")
    result = {"email_id": email_id, "outcomes": outcomes, "confirmations": confirmations}
    if as_json:
        emit_json(result)
    else:
        queued = f"; {len(confirmations)} confirmation(s) queued" if confirmations else ""
        console.print(f"answer to email {email_id} recorded{queued}")


@emails_app.command("examples")
def emails_examples(
    folder: Annotated[Path, typer.Option("--dir", help="Where to write.")] = Path("docs/emails"),
) -> None:
    """Render an example of every template into docs/emails/."""
    from comms_tasks.mail.examples import write_examples

    written = write_examples(folder)
    console.print(f"wrote {len(written)} files to {folder}")
