"""``comms calls``: the day's call sheet, its iCalendar file, and a call's outcome."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from comms_tasks.cli.shared import (
    USAGE_ERROR,
    DateOption,
    JsonOption,
    broker,
    console,
    database,
    emit_json,
    fail,
    request_outcomes,
    require_database,
    send_message,
)
from comms_tasks.local_time import local_clock, local_iso
from comms_tasks.settings import get_settings

calls_app = typer.Typer(help="Follow-up calls and the day's call sheet.", no_args_is_help=True)


def _day(value: str | None) -> dt.date:
    if value is None:
        return dt.datetime.now(get_settings().zone).date()
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise fail("--date: must be a date as YYYY-MM-DD", code=USAGE_ERROR) from None


def _sheet(day: dt.date) -> list[dict[str, Any]]:
    from comms_tasks.ops.reports import call_sheet

    with database() as session:
        return call_sheet(session, day)


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
    from comms_tasks.ops.call_calendar import call_sheet_calendar

    day = _day(date)
    content, written = call_sheet_calendar(day, _sheet(day), get_settings().zone)
    try:
        output.write_bytes(content)
    except OSError as exc:
        raise fail(f"--output: cannot write {output}: {exc.strerror or exc}") from None
    console.print(f"wrote {written} calls to {output}")


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

    from comms_tasks.contracts import ContractViolation, validate_command
    from comms_tasks.task_names import RECORD_CALL_OUTCOME

    require_database()
    requests = []
    request_ids: list[int] = []
    for request_id, outcome in request_outcomes(request, discussed=True):
        request_ids.append(request_id)
        requests.append(
            {
                "placement_request_id": request_id,
                "discussed": True,
                "outcome": outcome,
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
