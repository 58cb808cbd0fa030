"""``comms``: the operators' command line.

Tables for people, ``--json`` for scripts. Bad arguments and unknown ids end with a
one-line reason on stderr and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from kombu.exceptions import OperationalError as KombuOperationalError
from rich.console import Console
from rich.segment import Segment
from rich.table import Table
from rich.text import Text
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from typer.exceptions import TyperException

from comms_tasks.local_time import local_clock, local_iso, local_text
from comms_tasks.settings import ConfigurationError, get_settings

app = typer.Typer(
    help="Operate the communication service: status, dead letters, demo, database.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
dead_letters_app = typer.Typer(
    help="Inbound messages that failed validation.", no_args_is_help=True
)
contracts_app = typer.Typer(help="The JSON Schemas of the message contracts.", no_args_is_help=True)
emails_app = typer.Typer(help="Emails to therapists.", no_args_is_help=True)
explain_app = typer.Typer(help="Why the service does what it does.", no_args_is_help=True)
preview_app = typer.Typer(
    help="What the service would do next, without doing it.", no_args_is_help=True
)
calls_app = typer.Typer(help="Follow-up calls and the day's call sheet.", no_args_is_help=True)
app.add_typer(calls_app, name="calls")
app.add_typer(emails_app, name="emails")
app.add_typer(explain_app, name="explain")
app.add_typer(preview_app, name="preview")
app.add_typer(db_app, name="db")
app.add_typer(dead_letters_app, name="dead-letters")
app.add_typer(contracts_app, name="contracts")

_VISIBLE_CONTROLS = {
    code: f"\\x{code:02x}" for code in (*range(32), *range(127, 160)) if chr(code) not in "\t\n"
}


class SafeConsole(Console):
    """A console that shows control characters in values as ``\\x1b``, never sends them.

    Rows stored before the contract refused control characters may hold ESC sequences
    that would drive the operator's terminal (clear it, write the clipboard). Only the
    text of what is printed is changed; Rich's own styling codes are control segments.
    """

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        return super()._render_buffer(
            segment
            if segment.control
            else segment._replace(text=segment.text.translate(_VISIBLE_CONTROLS))
            for segment in buffer
        )


# Outside a terminal (pipes, CI) Rich would wrap tables at 80 columns.
_WIDTH = None if sys.stdout.isatty() else 160
# Every value shown comes from the database or a stranger's message: a name "Weber [/x]",
# an event id "[/oops]" or ":thumbs_up:" is shown as written. Neither console reads Rich
# markup or emoji codes in strings (table cells and titles included); styling is done
# with Text objects (see _field).
console = SafeConsole(width=_WIDTH, markup=False, emoji=False)
errors = SafeConsole(stderr=True, markup=False, emoji=False)

USAGE_ERROR = 2
ABORTED = 130

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

# Keys whose values are ids or vocabulary (comms_tasks.dead_letters.VISIBLE_KEYS): every
# other value of a dead letter is masked unless --reveal.
MASK = "***"


def say_error(reason: str) -> None:
    """One line on stderr: ``error: <reason>``."""
    errors.print(f"error: {reason}", markup=False, highlight=False, soft_wrap=True)


def fail(reason: str, code: int = 1) -> typer.Exit:
    say_error(reason)
    return typer.Exit(code)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _iso(value: dt.datetime | None) -> str | None:
    return local_iso(value)


@functools.cache
def require_database() -> None:
    """Stop with one line unless the database exists and is migrated (checked once).

    Only ``comms db upgrade`` creates a database: any other command pointed at a SQLite
    file that is not there says where it looked instead of leaving an empty file behind.
    """
    from comms_tasks import migrate

    reason = migrate.not_ready(get_settings().effective_database_url)
    if reason is not None:
        raise fail(reason)


def database() -> contextlib.AbstractContextManager[Session]:
    """One transaction on the configured database, once :func:`require_database` passed."""
    from comms_tasks.db import transaction

    require_database()
    return transaction()


# A broker that refuses, or accepts and never answers, is reported within seconds: each
# attempt to connect or to read waits this long, and there are this many attempts.
BROKER_TIMEOUT_SECONDS = 4.0
BROKER_ATTEMPTS = 2


def masked_broker_url(url: str) -> str:
    """The broker URL (or ``;``-separated failover URLs) with every password masked."""
    from kombu.utils.url import maybe_sanitize_url

    return ";".join(str(maybe_sanitize_url(part, mask=MASK)) for part in url.split(";"))


def broker_unreachable(url: str, error: BaseException) -> str:
    """One line naming ``COMMS_BROKER_URL``, masked; the reason without the password."""
    from kombu.utils.url import url_to_parts

    reason = (str(error).strip().splitlines() or [type(error).__name__])[0].strip()
    for part in url.split(";"):
        try:
            password = url_to_parts(part).password
        except Exception:  # noqa: BLE001 - an unparsable URL has no password to hide
            password = None
        if password:
            reason = reason.replace(password, MASK)
    return f"COMMS_BROKER_URL: cannot reach {masked_broker_url(url)}: {reason or 'no reason given'}"


@contextlib.contextmanager
def broker() -> Iterator[Any]:
    """A producer on a connection made for this command, with bounded waits.

    The app's own pool would retry a dead broker for long and, on Redis, wait forever for
    a server that accepted the connection and never answers; here both end after
    :data:`BROKER_ATTEMPTS` attempts with one line (see :func:`broker_unreachable`).
    """
    from kombu.exceptions import OperationalError

    from comms_tasks.app import app as celery_app

    url = str(celery_app.conf.broker_url)
    waits = {
        # Redis (the others ignore them)...
        "socket_timeout": BROKER_TIMEOUT_SECONDS,
        "socket_connect_timeout": BROKER_TIMEOUT_SECONDS,
        # ...and AMQP.
        "read_timeout": BROKER_TIMEOUT_SECONDS,
        "write_timeout": BROKER_TIMEOUT_SECONDS,
    }
    connection = celery_app.connection_for_write(
        connect_timeout=BROKER_TIMEOUT_SECONDS, transport_options=waits
    )
    try:
        with connection:
            connection.ensure_connection(
                max_retries=BROKER_ATTEMPTS - 1, interval_start=0, interval_step=1, interval_max=1
            )
            yield connection.Producer()
    except (OperationalError, OSError) as exc:
        raise fail(broker_unreachable(url, exc)) from None


def send_message(task_name: str, kwargs: dict[str, Any], **options: Any) -> None:
    """Send a public message as other services do, showing only its ids in task events."""
    from comms_tasks.app import app as celery_app
    from comms_tasks.privacy import identifying_repr

    argsrepr, kwargsrepr = identifying_repr([], kwargs)
    celery_app.send_task(
        task_name, kwargs=kwargs, argsrepr=argsrepr, kwargsrepr=kwargsrepr, **options
    )


# --- db ------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Run the migrations up to REVISION (default: the newest)."""
    from alembic.util import CommandError

    from comms_tasks import migrate

    url = get_settings().effective_database_url
    try:
        migrate.upgrade(url, revision)
    except CommandError as exc:
        raise fail(f"db upgrade: {_first_line(exc)}") from None
    console.print(f"database at revision {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision.")]) -> None:
    """Undo migrations down to REVISION (``base`` removes every table)."""
    from alembic.util import CommandError

    from comms_tasks import migrate

    url = get_settings().effective_database_url
    missing = migrate.not_there(url)
    if missing is not None:
        raise fail(missing)
    try:
        migrate.downgrade(url, revision)
    except CommandError as exc:
        raise fail(f"db downgrade: {_first_line(exc)}") from None
    console.print(f"database at revision {revision}")


# --- contracts -----------------------------------------------------------------------


@contracts_app.command("write")
def contracts_write(
    folder: Annotated[Path, typer.Option("--dir", help="Where to write.")] = Path("docs/contracts"),
) -> None:
    """Write the JSON Schema of every message into docs/contracts/."""
    from comms_tasks.contracts.schemas import write_schemas

    written = write_schemas(folder)
    console.print(f"wrote {len(written)} schemas to {folder}")


# --- dead letters --------------------------------------------------------------------


def mask(value: Any, *, visible: bool = False) -> Any:
    """The message with every value that is not a known id or vocabulary replaced by ***."""
    from comms_tasks.dead_letters import VISIBLE_KEYS

    if isinstance(value, dict):
        return {key: mask(item, visible=key in VISIBLE_KEYS) for key, item in value.items()}
    if isinstance(value, list):
        return [mask(item, visible=visible) for item in value]
    if value is None or visible:
        return value
    return MASK


def _letter_dict(letter: Any, *, payload: Any = None) -> dict[str, Any]:
    data = {
        "id": letter.id,
        "task_name": letter.task_name,
        "message_id": letter.message_id,
        "reason": letter.reason,
        "status": letter.status.value,
        "received_at": _iso(letter.received_at),
        "replay_count": letter.replay_count,
        "replayed_at": _iso(letter.replayed_at),
        "payload_redacted_at": _iso(letter.payload_redacted_at),
    }
    if payload is not None:
        data["payload"] = payload
    return data


@dead_letters_app.command("list")
def dead_letters_list(
    show_all: Annotated[bool, typer.Option("--all", help="Include replayed ones.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """List dead letters (pending ones unless --all)."""
    from comms_tasks.models import DeadLetter, DeadLetterStatus

    with database() as session:
        query = select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)
        if not show_all:
            query = query.where(DeadLetter.status == DeadLetterStatus.PENDING)
        letters = [_letter_dict(letter) for letter in session.scalars(query)]
    if as_json:
        emit_json(letters)
        return
    table = Table(title=f"Dead letters ({'all' if show_all else 'pending'})")
    for column in ("id", "received", "task", "message id", "status", "reason"):
        table.add_column(column, overflow="fold")
    for item in letters:
        table.add_row(
            str(item["id"]),
            local_text(item["received_at"]),
            item["task_name"],
            item["message_id"] or "-",
            item["status"] + (" (redacted)" if item["payload_redacted_at"] else ""),
            item["reason"],
        )
    console.print(table)


@dead_letters_app.command("show")
def dead_letters_show(
    dead_letter_id: Annotated[int, typer.Argument(help="The dead letter's id.")],
    reveal: Annotated[
        bool, typer.Option("--reveal", help="Show values that may be patient data.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Show one dead letter with the message it kept (patient data masked)."""
    from comms_tasks.models import DeadLetter

    with database() as session:
        letter = session.get(DeadLetter, dead_letter_id)
        if letter is None:
            raise fail(f"dead letter {dead_letter_id} does not exist")
        data = _letter_dict(letter, payload=letter.payload if reveal else mask(letter.payload))
    if as_json:
        emit_json(data)
        return
    for key, value in data.items():
        if key != "payload":
            console.print(_field(key, value), highlight=False)
    console.print(_field("payload", ""))
    console.print_json(json.dumps(data["payload"], ensure_ascii=False))


@dead_letters_app.command("replay")
def dead_letters_replay(
    dead_letter_ids: Annotated[
        list[int] | None, typer.Argument(help="Dead letter ids (or --all).")
    ] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Every pending one.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Validate and apply dead letters again (e.g. after the producer was fixed)."""
    from rich.progress import track

    from comms_tasks.inbox import NotReplayable, replay
    from comms_tasks.models import DeadLetter, DeadLetterStatus
    from comms_tasks.tasks import APPLIERS

    if bool(dead_letter_ids) == replay_all:
        raise fail("give dead letter ids or --all, not both or neither", code=USAGE_ERROR)
    if replay_all:
        with database() as session:
            dead_letter_ids = list(
                session.scalars(
                    select(DeadLetter.id)
                    .where(DeadLetter.status == DeadLetterStatus.PENDING)
                    # A redacted message has nothing left to apply.
                    .where(DeadLetter.payload_redacted_at.is_(None))
                    .order_by(DeadLetter.id)
                )
            )
    require_database()
    ids = dead_letter_ids or []
    results = []
    for letter_id in track(ids, description="replaying", console=errors, disable=len(ids) < 10):
        try:
            results.append({"id": letter_id, **replay(letter_id, APPLIERS).as_dict()})
        except NotReplayable as exc:
            if not replay_all and len(ids) == 1:
                raise fail(str(exc)) from None
            results.append({"id": letter_id, "result": "not_replayable", "reason": str(exc)})
    if as_json:
        emit_json(results)
    else:
        table = Table(title="Replay")
        for column in ("id", "result", "reason"):
            table.add_column(column, overflow="fold")
        for item in results:
            table.add_row(str(item["id"]), item["result"], item.get("reason") or "")
        console.print(table)
    if any(item["result"] != "applied" and item["result"] != "duplicate" for item in results):
        raise typer.Exit(1)


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
    from comms_tasks.models import Email, EmailStatus

    query = select(Email).order_by(Email.id.desc()).limit(limit)
    if status_filter is not None:
        try:
            query = query.where(Email.status == EmailStatus(status_filter))
        except ValueError:
            choices = ", ".join(s.value for s in EmailStatus)
            raise fail(f"--status: must be one of {choices}", code=USAGE_ERROR) from None
    if therapist is not None:
        query = query.where(Email.therapist_id == therapist)
    with database() as session:
        items = [_email_summary(email) for email in session.scalars(query)]
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
    from comms_tasks.sending import retry_now

    _change_email(email_id, retry_now, "retried", as_json)


@emails_app.command("cancel")
def emails_cancel(
    email_id: Annotated[int, typer.Argument(help="The email's id.")], as_json: JsonOption = False
) -> None:
    """Cancel an email that has not been sent."""
    from comms_tasks.sending import cancel

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

    from comms_tasks.contracts import ContractViolation, inbound
    from comms_tasks.emails import record_response
    from comms_tasks.models.base import utcnow

    outcomes: list[dict[str, Any]] = []
    for item in request or []:
        request_id, _, outcome = item.partition("=")
        if not request_id.isdigit() or outcome not in ("accepted", "rejected", "needs_follow_up"):
            raise fail(f"--request: {item!r} is not REQUEST_ID=OUTCOME", code=USAGE_ERROR)
        if any(named["placement_request_id"] == int(request_id) for named in outcomes):
            raise fail(f"--request: request {request_id} is named twice", code=USAGE_ERROR)
        outcomes.append(
            {"placement_request_id": int(request_id), "outcome": outcome, "notes": None}
        )
    now = utcnow()
    try:
        command = inbound.RecordEmailResponse.model_validate(
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
                send_message("comms.send_email", {}, producer=producer)
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


# --- calls ---------------------------------------------------------------------------

DateOption = Annotated[
    str | None, typer.Option("--date", help="The local day, YYYY-MM-DD (default: today).")
]


def _day(value: str | None) -> dt.date:
    if value is None:
        return dt.datetime.now(get_settings().zone).date()
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise fail("--date: must be a date as YYYY-MM-DD", code=USAGE_ERROR) from None


def _sheet(day: dt.date) -> list[dict[str, Any]]:
    from comms_tasks.reports import call_sheet

    with database() as session:
        return call_sheet(session, day)


def _field(key: str, value: Any) -> Text:
    """``key: value``, the key in bold; the value as written, whatever brackets it holds.

    A time (``*_at``, held as ISO) is shown in local time with its zone, to the second.
    """
    if key.endswith("_at") and isinstance(value, str) and value:
        value = local_text(value, seconds=True)
    return Text.assemble((key, "bold"), f": {value}" if value != "" else ":")


def _patient_line(patient: dict[str, Any]) -> str:
    facts = [
        patient["diagnosis"],
        patient["gender"],
        patient["time_availability"] and f"Zeit: {patient['time_availability']}",
        patient["registered_on"] and f"registriert {patient['registered_on']}",
    ]
    details = "; ".join(str(fact) for fact in facts if fact)
    state = patient["request_status"] or "unknown"
    return f"Nr. {patient['placement_request_id']} ({state}): {details or 'keine Angaben'}"


@calls_app.command("today")
def calls_today(date: DateOption = None, as_json: JsonOption = False) -> None:
    """The day's call sheet: time, therapist, phone, and the patients to discuss."""
    day = _day(date)
    sheet = _sheet(day)
    if as_json:
        emit_json({"date": day.isoformat(), "calls": sheet})
        return
    table = Table(title=f"Calls on {day:%A, %d.%m.%Y}")
    for column in ("time", "call", "therapist", "phone", "status", "patients to discuss"):
        table.add_column(column, overflow="fold")
    for call in sheet:
        table.add_row(
            local_clock(call["scheduled_at"]),
            str(call["call_id"]),
            call["therapist"] or f"therapist {call['therapist_id']}",
            call["phone"] or "-",
            call["status"] + (f" (attempt {call['attempt']})" if call["attempt"] > 1 else ""),
            "\n".join(_patient_line(patient) for patient in call["patients"]),
        )
    console.print(table)
    if not sheet:
        console.print("no calls on this day")


@calls_app.command("ics")
def calls_ics(
    output: Annotated[Path, typer.Option("-o", "--output", help="The .ics file to write.")],
    date: DateOption = None,
) -> None:
    """Write the day's calls as an iCalendar file (ids and phone numbers, no health data)."""
    import icalendar

    day = _day(date)
    zone = get_settings().zone
    calendar = icalendar.Calendar()
    calendar.add("prodid", "-//Therapievermittlung//comms call sheet//DE")
    calendar.add("version", "2.0")
    calendar.add("x-wr-calname", f"Rückrufe {day:%d.%m.%Y}")
    stamp = dt.datetime.now(dt.UTC)
    sheet = [call for call in _sheet(day) if call["status"] == "scheduled"]
    for call in sheet:
        start = dt.datetime.fromisoformat(call["scheduled_at"]).astimezone(zone)
        event = icalendar.Event()
        event.add("uid", f"comms-call-{call['call_id']}@therapievermittlung")
        event.add("dtstamp", stamp)
        event.add("dtstart", start)
        event.add("dtend", start + dt.timedelta(minutes=call["duration_minutes"]))
        event.add("summary", f"Rückruf {call['therapist'] or call['therapist_id']}")
        requests = ", ".join(f"Nr. {p['placement_request_id']}" for p in call["patients"])
        event.add(
            "description",
            f"Telefon: {call['phone'] or '-'}\nAnfragen: {requests}\n"
            f"Details: comms calls today --date {day.isoformat()}",
        )
        if call["phone"]:
            event.add("location", call["phone"])
        calendar.add_component(event)
    calendar.add_missing_timezones()
    try:
        output.write_bytes(calendar.to_ical())
    except OSError as exc:
        raise fail(f"--output: cannot write {output}: {exc.strerror or exc}") from None
    console.print(f"wrote {len(sheet)} calls to {output}")


def _check_outcome_options(status: str, with_requests: bool, retry_after: str | None) -> None:
    """Options that cannot go with the status: the worker would ignore or refuse them."""
    if with_requests and status != "completed":
        raise fail(
            f"--request: only with --status completed (a {status} call discussed nothing)",
            code=USAGE_ERROR,
        )
    if retry_after is None:
        return
    if status != "failed":
        raise fail("--retry-after: only with --status failed", code=USAGE_ERROR)
    today = dt.datetime.now(get_settings().zone).date()
    # The contract has checked the shape already.
    if dt.date.fromisoformat(retry_after) < today:
        raise fail(
            f"--retry-after: {retry_after} lies in the past (today is {today.isoformat()})",
            code=USAGE_ERROR,
        )


def _check_outcome_against_the_call(call_id: int, request_ids: list[int]) -> None:
    """What the database knows: the call exists, is still scheduled, has these requests.

    The worker checks again when it applies the message (a call may change meanwhile);
    this is so that the operator hears of a mistake at once instead of in a dead letter.
    """
    from comms_tasks.models import PhoneCall, PhoneCallStatus

    with database() as session:
        call = session.get(PhoneCall, call_id)
        if call is None:
            raise fail(f"call {call_id} does not exist")
        if call.status is not PhoneCallStatus.SCHEDULED:
            raise fail(f"call {call_id} is already {call.status.value}: its outcome was recorded")
        on_the_call = sorted(batch.placement_request_id for batch in call.batches)
    for request_id in request_ids:
        if request_id not in on_the_call:
            raise fail(
                f"--request: request {request_id} is not part of call {call_id} "
                f"(its requests: {', '.join(map(str, on_the_call))})"
            )


@calls_app.command("outcome")
def calls_outcome(
    call_id: Annotated[int, typer.Argument(help="The call's id.")],
    status_value: Annotated[
        str, typer.Option("--status", help="completed, failed (no answer) or cancelled.")
    ],
    request: Annotated[
        list[str] | None,
        typer.Option(
            "--request",
            help="REQUEST_ID=accepted|rejected|needs_follow_up|discussed, repeatable.",
        ),
    ] = None,
    notes: Annotated[str | None, typer.Option(help="Notes on the call.")] = None,
    retry_after: Annotated[
        str | None, typer.Option(help="For failed: try again on this day or later.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Send the outcome of a call to the service, as the record_call_outcome message."""
    import uuid

    from comms_tasks.contracts import RECORD_CALL_OUTCOME, ContractViolation, validate_command

    require_database()
    requests = []
    request_ids: list[int] = []
    for item in request or []:
        request_id, _, outcome = item.partition("=")
        if not request_id.isdigit() or outcome not in (
            "accepted",
            "rejected",
            "needs_follow_up",
            "discussed",
        ):
            raise fail(f"--request: {item!r} is not REQUEST_ID=OUTCOME", code=USAGE_ERROR)
        request_ids.append(int(request_id))
        requests.append(
            {
                "placement_request_id": int(request_id),
                "discussed": True,
                "outcome": None if outcome == "discussed" else outcome,
                "notes": None,
            }
        )
    command = {
        "command_id": str(uuid.uuid4()),
        "call_id": call_id,
        "status": status_value,
        "occurred_at": local_iso(dt.datetime.now(dt.UTC)),
        "outcome": None,
        "notes": notes,
        "retry_after": retry_after,
        "requests": requests,
    }
    try:
        validate_command(RECORD_CALL_OUTCOME, command)
    except ContractViolation as exc:
        raise fail(exc.reason.removeprefix("command."), code=USAGE_ERROR) from None
    _check_outcome_options(status_value, bool(requests), retry_after)
    _check_outcome_against_the_call(call_id, request_ids)
    with broker() as producer:
        send_message(RECORD_CALL_OUTCOME, {"command": command}, producer=producer)
    if as_json:
        emit_json(command)
    else:
        console.print(f"sent the outcome of call {call_id} (command {command['command_id']})")


# --- explain and preview ---------------------------------------------------------------


def _preview(therapist_id: int) -> Any:
    """What the next batch would do for the therapist, computed and rolled back."""
    from comms_tasks.emails import preview_batch
    from comms_tasks.models.base import utcnow

    with database() as session:
        try:
            result = preview_batch(session, therapist_id, utcnow(), get_settings())
        except LookupError as exc:
            raise fail(str(exc)) from None
        session.rollback()
    return result


@explain_app.command("therapist")
def explain_therapist(
    therapist_id: Annotated[int, typer.Argument(help="The therapist's id.")],
    as_json: JsonOption = False,
) -> None:
    """Whether the next batch would email this therapist, and if not, why and from when."""
    verdict, template, request_ids, _ = _preview(therapist_id)
    # A local calendar day: the first batch run on that day or later may email them.
    since = verdict.contactable_from
    data = {
        "therapist_id": therapist_id,
        "contactable": verdict.contactable,
        "reason": verdict.reason,
        "contactable_from": since.isoformat() if since else None,
        "requests_waiting": request_ids,
        "next_template": template.value if template else None,
    }
    if as_json:
        emit_json(data)
        return
    if verdict.contactable and request_ids:
        console.print(
            f"therapist {therapist_id} is contactable: the next batch asks about "
            f"requests {', '.join(map(str, request_ids))} ({data['next_template']})"
        )
    elif verdict.contactable:
        console.print(f"therapist {therapist_id} is contactable, but no request is waiting")
    else:
        again = f"; contactable again from {since:%Y-%m-%d}" if since else ""
        console.print(f"therapist {therapist_id} is not contactable: {verdict.reason}{again}")


@preview_app.command("therapist")
def preview_therapist(
    therapist_id: Annotated[int, typer.Argument(help="The therapist's id.")],
    html: Annotated[bool, typer.Option("--html", help="Print the HTML part instead.")] = False,
    as_json: JsonOption = False,
) -> None:
    """The email the next batch would send this therapist; nothing is sent or stored."""
    verdict, template, request_ids, rendered = _preview(therapist_id)
    if rendered is None or template is None:
        raise fail(f"therapist {therapist_id} has no request waiting for an email")
    if as_json:
        emit_json(
            {
                "therapist_id": therapist_id,
                "contactable": verdict.contactable,
                "reason": verdict.reason,
                "template": template.value,
                "placement_request_ids": request_ids,
                "subject": rendered.subject,
                "body_text": rendered.body_text,
                "body_html": rendered.body_html,
            }
        )
        return
    if not verdict.contactable:
        errors.print(f"note: not contactable now ({verdict.reason})", markup=False)
    console.print(f"Subject: {rendered.subject}\n", markup=False, highlight=False)
    console.print(rendered.body_html if html else rendered.body_text, markup=False, highlight=False)


@app.command("purge-expired")
def purge_expired_command(as_json: JsonOption = False) -> None:
    """Redact email bodies, dead letters, call notes and status reasons past the retention
    period now (beat does it nightly)."""
    from rich.progress import Progress

    from comms_tasks.models.base import utcnow
    from comms_tasks.retention import purge_all_expired

    require_database()
    settings = get_settings()
    # Progress is for a person at a terminal; in a pipe it would leave an empty line.
    with Progress(console=errors, transient=True, disable=not errors.is_terminal) as progress:
        bar = progress.add_task("redacting", total=None)
        redacted = purge_all_expired(
            utcnow(),
            settings.retention_days,
            on_chunk=lambda count: progress.update(bar, advance=count),
        )
    if as_json:
        emit_json(redacted)
    else:
        console.print(
            f"redacted {redacted['redacted']} email bodies, "
            f"{redacted['dead_letters_redacted']} dead letters, "
            f"{redacted['calls_redacted']} calls' notes, "
            f"{redacted['status_reasons_redacted']} status reasons and "
            f"{redacted['mail_redacted']} messages from the mailbox older than "
            f"{settings.retention_days} days; removed {redacted['outbox_files_removed']} "
            "outbox copies of redacted emails",
            highlight=False,
        )


# --- status --------------------------------------------------------------------------


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Counts per status, the oldest queued email, the outbox backlog, dead letters."""
    from comms_tasks.reports import status_snapshot

    with database() as session:
        snapshot = status_snapshot(session)
    if as_json:
        emit_json(snapshot)
        return
    print_status(snapshot)


def print_status(snapshot: dict[str, Any]) -> None:
    table = Table(title="Communication service")
    table.add_column("what")
    table.add_column("count", justify="right")
    for group in ("therapists", "placement_requests", "emails", "phone_calls"):
        for state, count in snapshot[group].items():
            table.add_row(f"{group.replace('_', ' ')}: {state}", str(count))
        table.add_section()
    age = snapshot["oldest_queued_email_age_seconds"]
    table.add_row("oldest queued email", "-" if age is None else f"{age} s")
    table.add_row("retries due now", str(snapshot["retries_due"]))
    table.add_row("retries waiting", str(snapshot["retries_waiting"]))
    table.add_row("outbox pending", str(snapshot["outbox_pending"]))
    table.add_row("dead letters pending", str(snapshot["dead_letters_pending"]))
    mailbox = snapshot["mailbox"]
    table.add_row("mailbox: unmatched", str(mailbox["unmatched"]))
    table.add_row("mailbox: to review", str(mailbox["to_review"]))
    polled = local_text(mailbox["last_poll_at"], missing="never")
    if mailbox["last_poll_error"]:
        polled += f" ({mailbox['last_poll_error']})"
    table.add_row("mailbox: last poll", polled)
    console.print(table)
    runs = Table(title="Scheduled tasks")
    for column in ("task", "last finished", "state"):
        runs.add_column(column)
    for name, run in snapshot["last_runs"].items():
        last = local_text(run["last_finished_at"], missing="never")
        runs.add_row(name, last, run["last_state"] or "-")
    console.print(runs)


# --- demo and run --------------------------------------------------------------------


@app.command()
def demo(
    with_history: Annotated[
        bool,
        typer.Option(
            "--history/--no-history",
            help="Also record a few emails sent nine days ago, still unanswered.",
        ),
    ] = True,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Load it even into a database that holds data other than the demo's "
            "(never in production: fake therapists 1-30 and 'sent' emails).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Load a realistic sample by sending the public messages other services send.

    Only into an empty database, or one holding the demo's own data (then it changes
    nothing), unless --force.
    """
    from rich.progress import track

    from comms_tasks.demo import demo_messages
    from comms_tasks.demo_guard import data_not_from_the_demo, describe
    from comms_tasks.settings import safe_database_url

    messages = demo_messages(dt.datetime.now(dt.UTC))
    with database() as session:
        foreign = data_not_from_the_demo(session, messages)
    if foreign and not force:
        where = safe_database_url(get_settings().effective_database_url)
        raise fail(
            f"the database at {where} holds data that is not the demo's ({describe(foreign)}): "
            "the demo loads only into an empty database; --force loads it anyway"
        )
    sent: dict[str, int] = {}
    with broker() as producer:
        for message in track(messages, description="sending demo messages", console=errors):
            send_message(message.task_name, message.kwargs, producer=producer)
            event_type = message.kwargs["event"]["event_type"]
            sent[event_type] = sent.get(event_type, 0) + 1
    history = answers = 0
    if with_history:
        from comms_tasks.demo_history import past_emails, record_past_emails
        from comms_tasks.demo_mail import drop_demo_mail

        with database() as session:
            history = record_past_emails(
                session, past_emails(messages), dt.datetime.now(dt.UTC), get_settings()
            )
        with database() as session:
            answers = drop_demo_mail(session, get_settings())
    if as_json:
        emit_json({"sent": sent, "past_emails": history, "mailbox_messages": answers})
        return
    for event_type, count in sent.items():
        console.print(f"sent {count} {event_type} messages")
    if history:
        console.print(f"recorded {history} emails sent nine days ago and not yet answered")
    if answers:
        console.print(
            f"put {answers} answers to them into the mailbox {get_settings().mailbox_folder}/"
            " (a reply, an out-of-office, a bounce)",
            highlight=False,
        )


def _queued_messages() -> int | None:
    """Messages waiting on the default queue, or None if the broker cannot be asked."""
    from comms_tasks.app import app as celery_app

    try:
        with celery_app.connection_for_read() as connection:
            queue = celery_app.conf.task_default_queue
            return int(connection.default_channel.queue_declare(queue, passive=True).message_count)
    except Exception:  # noqa: BLE001 - only informative
        return None


def _celery(*arguments: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "comms_tasks", *arguments])


def _report_run(snapshot: dict[str, Any], settings: Any, since: dt.datetime) -> None:
    from comms_tasks.models import Email, EmailStatus, PhoneCall, PhoneCallStatus

    console.rule("what happened")
    print_status(snapshot)
    console.print(
        f"Loaded through messages: {sum(snapshot['therapists'].values())} therapists and "
        f"{sum(snapshot['placement_requests'].values())} placement requests.",
        highlight=False,
    )
    with database() as session:
        sent = session.execute(
            select(Email.therapist_id)
            .where(Email.status == EmailStatus.SENT)
            .where(Email.sent_at >= since)
        ).all()
    if sent:
        console.print(
            f"Sent {len(sent)} emails to {len({row[0] for row in sent})} therapists in this run.",
            highlight=False,
        )
    files = sorted(settings.outbox_folder.glob("*.eml"))
    if files:
        console.print(
            f"Mail written to {settings.outbox_folder}/; open {files[0]}", highlight=False
        )
    with database() as session:
        first_call = session.scalar(
            select(PhoneCall.scheduled_date)
            .where(PhoneCall.status == PhoneCallStatus.SCHEDULED)
            .order_by(PhoneCall.scheduled_at)
            .limit(1)
        )
    _report_mailbox()
    if first_call is not None:
        console.print("Follow-up calls are booked; the first day's call sheet:", highlight=False)
        calls_today(date=first_call.isoformat(), as_json=False)


def _report_mailbox() -> None:
    """One line per message read from the mailbox: what it was and what it changed."""
    from comms_tasks.models import Email, InboundMail, InboundMailKind, PhoneCall

    with database() as session:
        mails = session.scalars(select(InboundMail).order_by(InboundMail.id)).all()
        lines = []
        for mail in mails:
            email = session.get(Email, mail.email_id) if mail.email_id else None
            calls = (
                session.scalars(select(PhoneCall).where(PhoneCall.email_id == email.id)).all()
                if email
                else []
            )
            call = ", ".join(f"call {c.id} {c.status.value}" for c in calls) or "no call"
            if email is None:
                effect = "kept for operators (comms mailbox list --unmatched)"
            elif mail.kind is InboundMailKind.REPLY:
                effect = f"response recorded on email {email.id}; {call}"
            elif mail.kind is InboundMailKind.AUTO_REPLY:
                effect = f"kept on email {email.id}, not a response; {call}"
            elif mail.kind is InboundMailKind.BOUNCE:
                effect = (
                    f"email {email.id} undeliverable ({mail.status_code or 'no status'}), "
                    f"the address flagged; {call}"
                )
            else:
                effect = f"noted on email {email.id} ({mail.status_code or 'no status'}); {call}"
            lines.append(f"mailbox message {mail.id}: {mail.kind.value}: {effect}")
    if lines:
        console.print("Read from the mailbox:", highlight=False)
        for line in lines:
            console.print(f"  {line}", highlight=False)


@app.command()
def run(
    seconds: Annotated[
        float | None, typer.Option("--for", help="Stop after this many seconds.")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
    until_idle: Annotated[
        bool, typer.Option("--until-idle", help="Stop once the work has settled and is reported.")
    ] = False,
    batch_now: Annotated[
        bool,
        typer.Option("--batch-now", help="Run the weekly batch once the inbox is drained."),
    ] = False,
) -> None:
    """Run a worker and beat in the foreground and report what they did."""
    from comms_tasks.app import app as celery_app
    from comms_tasks.reports import activity_counts, describe_changes, status_snapshot

    settings = get_settings()
    # Before worker and beat start, so a wrong URL is said once, not by each of them.
    require_database()
    with broker():
        pass
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    log_level = settings.log_level
    worker = _celery("worker", f"--loglevel={log_level}", f"--concurrency={concurrency}")
    beat = _celery("beat", f"--loglevel={log_level}")
    started = time.monotonic()
    run_started = dt.datetime.now(dt.UTC)
    stopping = False

    def stop(*_args: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Counts of work done: the first run is reported in full once they have settled, then
    # each change is one line (beat's own bookkeeping every few seconds is no change).
    counts: dict[str, int] | None = None
    reported = False
    quiet_since = time.monotonic()
    # The daily pipeline, run at once when asked: the batch, then the follow-up check.
    kicks = (
        ["comms.batch_requests", "comms.follow_up_check", "comms.poll_mailbox"] if batch_now else []
    )
    try:
        while not stopping and (seconds is None or time.monotonic() - started < seconds):
            time.sleep(1)
            if worker.poll() is not None or beat.poll() is not None:
                raise fail("worker or beat exited; see its output above")
            with database() as session:
                snapshot = status_snapshot(session)
            now_counts = activity_counts(snapshot)
            if reported:
                stamp = local_clock(dt.datetime.now(dt.UTC), seconds=True)
                for change in describe_changes(counts or {}, now_counts):
                    console.print(f"{stamp} {change}", highlight=False, markup=False)
                counts = now_counts
                continue
            if now_counts != counts:
                counts, quiet_since = now_counts, time.monotonic()
                continue
            # Act once the queue is drained and nothing has changed for a while.
            if time.monotonic() - quiet_since <= 3 or _queued_messages() not in (0, None):
                continue
            if kicks:
                task_name = kicks.pop(0)
                console.print(f"all quiet: running {task_name} now", highlight=False)
                celery_app.send_task(task_name)
                quiet_since = time.monotonic()
                continue
            _report_run(snapshot, settings, run_started)
            reported = True
            if until_idle:
                break
            console.print("Worker and beat keep running; Ctrl-C stops them; changes follow.")
    finally:
        for process in (beat, worker):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (beat, worker):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _add_mailbox_commands() -> None:
    # Its own module (comms_tasks/mailbox/commands.py), which uses the helpers above.
    from comms_tasks.mailbox.commands import mailbox_app

    app.add_typer(mailbox_app, name="mailbox")


_add_mailbox_commands()


def main() -> None:
    try:
        get_settings()
    except ConfigurationError as exc:
        say_error(str(exc))
        raise SystemExit(USAGE_ERROR) from None
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        result = app(standalone_mode=False)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(ABORTED) from None
    except SQLAlchemyError as exc:
        from comms_tasks.db import connection_failure

        unreachable = connection_failure(exc, get_settings().effective_database_url)
        if unreachable is not None:
            say_error(unreachable)
            raise SystemExit(1) from None
        first_line = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        say_error(f"database: {first_line} (is it reachable and migrated? `comms db upgrade`)")
        raise SystemExit(1) from None
    except TyperException as exc:
        # Bad arguments: one line naming what is wrong, instead of a usage screen.
        reason = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        say_error(reason)
        raise SystemExit(USAGE_ERROR) from None
    except KombuOperationalError as exc:
        # The broker went away after the command reached it (see broker()).
        say_error(broker_unreachable(get_settings().effective_broker_url, exc))
        raise SystemExit(1) from None
    except OSError as exc:
        if exc.filename is None:
            raise
        say_error(f"{exc.filename}: {exc.strerror or exc}")
        raise SystemExit(1) from None
    raise SystemExit(result if isinstance(result, int) else 0)
