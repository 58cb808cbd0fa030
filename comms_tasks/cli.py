"""``comms``: the operators' command line.

Tables for people, ``--json`` for scripts. Bad arguments and unknown ids end with a
one-line reason on stderr and a non-zero exit.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

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
app.add_typer(db_app, name="db")
app.add_typer(dead_letters_app, name="dead-letters")
app.add_typer(contracts_app, name="contracts")

# Outside a terminal (pipes, CI) Rich would wrap tables at 80 columns.
_WIDTH = None if sys.stdout.isatty() else 160
console = Console(width=_WIDTH)
errors = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

# Keys of an inbound message whose values may be health data; masked unless --reveal.
SENSITIVE_KEYS = frozenset({"patient", "content", "notes", "outcome", "reason"})
MASK = "***"


def fail(reason: str, code: int = 1) -> typer.Exit:
    errors.print(f"error: {reason}", markup=False, highlight=False)
    return typer.Exit(code)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


# --- db ------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Run the migrations up to REVISION (default: the newest)."""
    from comms_tasks import migrate

    url = get_settings().effective_database_url
    migrate.upgrade(url, revision)
    console.print(f"database at revision {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision.")]) -> None:
    """Undo migrations down to REVISION (``base`` removes every table)."""
    from comms_tasks import migrate

    migrate.downgrade(get_settings().effective_database_url, revision)
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


def mask(value: Any) -> Any:
    """The message with every possibly sensitive value replaced by ``***``."""
    if isinstance(value, dict):
        return {
            key: (MASK if key in SENSITIVE_KEYS and item is not None else mask(item))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [mask(item) for item in value]
    return value


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
    from comms_tasks.db import transaction
    from comms_tasks.models import DeadLetter, DeadLetterStatus

    with transaction() as session:
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
            item["received_at"][:19],
            item["task_name"],
            item["message_id"] or "-",
            item["status"],
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
    from comms_tasks.db import transaction
    from comms_tasks.models import DeadLetter

    with transaction() as session:
        letter = session.get(DeadLetter, dead_letter_id)
        if letter is None:
            raise fail(f"dead letter {dead_letter_id} does not exist")
        data = _letter_dict(letter, payload=letter.payload if reveal else mask(letter.payload))
    if as_json:
        emit_json(data)
        return
    for key, value in data.items():
        if key != "payload":
            console.print(f"[bold]{key}[/bold]: {value}", highlight=False)
    console.print("[bold]payload[/bold]:")
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

    from comms_tasks.db import transaction
    from comms_tasks.inbox import NotReplayable, replay
    from comms_tasks.models import DeadLetter, DeadLetterStatus
    from comms_tasks.tasks.inbound import APPLIERS

    if bool(dead_letter_ids) == replay_all:
        raise fail("give dead letter ids or --all, not both or neither", code=2)
    if replay_all:
        with transaction() as session:
            dead_letter_ids = list(
                session.scalars(
                    select(DeadLetter.id)
                    .where(DeadLetter.status == DeadLetterStatus.PENDING)
                    .order_by(DeadLetter.id)
                )
            )
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


# --- status --------------------------------------------------------------------------


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Counts per status, the oldest queued email, the outbox backlog, dead letters."""
    from comms_tasks.db import transaction
    from comms_tasks.reports import status_snapshot

    with transaction() as session:
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
    table.add_row("outbox pending", str(snapshot["outbox_pending"]))
    table.add_row("dead letters pending", str(snapshot["dead_letters_pending"]))
    console.print(table)


# --- demo and run --------------------------------------------------------------------


@app.command()
def demo(as_json: JsonOption = False) -> None:
    """Load a realistic sample by sending the public messages other services send."""
    from rich.progress import track

    from comms_tasks.app import app as celery_app
    from comms_tasks.demo import demo_messages

    messages = demo_messages(dt.datetime.now(dt.UTC))
    sent: dict[str, int] = {}
    with celery_app.producer_or_acquire() as producer:
        for message in track(messages, description="sending demo messages", console=errors):
            celery_app.send_task(message.task_name, kwargs=message.kwargs, producer=producer)
            event_type = message.kwargs["event"]["event_type"]
            sent[event_type] = sent.get(event_type, 0) + 1
    if as_json:
        emit_json({"sent": sent})
        return
    for event_type, count in sent.items():
        console.print(f"sent {count} {event_type} messages")


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


@app.command()
def run(
    seconds: Annotated[
        float | None, typer.Option("--for", help="Stop after this many seconds.")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
    until_idle: Annotated[
        bool, typer.Option("--until-idle", help="Stop once the work has settled and is reported.")
    ] = False,
) -> None:
    """Run a worker and beat in the foreground and report what they did."""
    from comms_tasks.db import transaction
    from comms_tasks.reports import status_snapshot

    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    log_level = settings.log_level
    worker = _celery("worker", f"--loglevel={log_level}", f"--concurrency={concurrency}")
    beat = _celery("beat", f"--loglevel={log_level}")
    started = time.monotonic()
    stopping = False

    def stop(*_args: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reported: dict[str, Any] | None = None
    quiet_since = time.monotonic()
    try:
        while not stopping and (seconds is None or time.monotonic() - started < seconds):
            time.sleep(1)
            if worker.poll() is not None or beat.poll() is not None:
                raise fail("worker or beat exited; see its output above")
            with transaction() as session:
                snapshot = status_snapshot(session)
            if snapshot != reported:
                reported, quiet_since = snapshot, time.monotonic()
                continue
            # Report once the queue is drained and nothing has changed for a while.
            if time.monotonic() - quiet_since > 3 and _queued_messages() in (0, None):
                console.rule("what happened")
                print_status(snapshot)
                console.print(
                    f"Loaded through messages: {sum(snapshot['therapists'].values())} "
                    f"therapists and {sum(snapshot['placement_requests'].values())} "
                    "placement requests."
                    + ("" if until_idle else " Worker and beat keep running; Ctrl-C stops them."),
                    highlight=False,
                )
                quiet_since = float("inf")
                if until_idle:
                    break
    finally:
        for process in (beat, worker):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (beat, worker):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    try:
        get_settings()
    except ConfigurationError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        raise SystemExit(2) from None
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
