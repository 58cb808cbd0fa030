"""``comms demo`` and ``comms run``: the demo's data, and the pipeline run once and shown."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import time
from typing import Annotated, Any

import typer

from comms_tasks.cli.call_commands import calls_today
from comms_tasks.cli.shared import (
    JsonOption,
    app,
    broker,
    console,
    database,
    emit_json,
    errors,
    fail,
    require_database,
    send_message,
)
from comms_tasks.cli.status_commands import print_status
from comms_tasks.local_time import local_clock
from comms_tasks.ops import listings
from comms_tasks.settings import get_settings
from comms_tasks.task_names import BATCH_REQUESTS, FOLLOW_UP_CHECK, POLL_MAILBOX

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

    from comms_tasks.database_urls import safe_database_url
    from comms_tasks.ops.demo import demo_messages
    from comms_tasks.ops.demo_guard import data_not_from_the_demo, describe

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
        from comms_tasks.ops.demo_history import past_emails, record_past_emails
        from comms_tasks.ops.demo_mail import drop_demo_mail

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

    console.rule("what happened")
    print_status(snapshot)
    console.print(
        f"Loaded through messages: {sum(snapshot['therapists'].values())} therapists and "
        f"{sum(snapshot['placement_requests'].values())} placement requests.",
        highlight=False,
    )
    with database() as session:
        sent = listings.therapists_emailed_since(session, since)
    if sent:
        console.print(
            f"Sent {len(sent)} emails to {len(set(sent))} therapists in this run.",
            highlight=False,
        )
    files = sorted(settings.outbox_folder.glob("*.eml"))
    if files:
        console.print(
            f"Mail written to {settings.outbox_folder}/; open {files[0]}", highlight=False
        )
    with database() as session:
        first_call = listings.first_call_day(session)
    _report_mailbox()
    if first_call is not None:
        console.print("Follow-up calls are booked; the first day's call sheet:", highlight=False)
        calls_today(date=first_call.isoformat(), as_json=False)


def _report_mailbox() -> None:
    """One line per message read from the mailbox: what it was and what it changed."""
    from comms_tasks.models import InboundMailKind

    with database() as session:
        effects = listings.mailbox_effects(session)
    lines = []
    for mail in effects:
        call = ", ".join(f"call {call_id} {status.value}" for call_id, status in mail.calls)
        call = call or "no call"
        status_code = mail.status_code or "no status"
        if mail.email_id is None:
            effect = "kept for operators (comms mailbox list --unmatched)"
        elif mail.kind is InboundMailKind.REPLY:
            effect = f"response recorded on email {mail.email_id}; {call}"
        elif mail.kind is InboundMailKind.AUTO_REPLY:
            effect = f"kept on email {mail.email_id}, not a response; {call}"
        elif mail.kind is InboundMailKind.BOUNCE:
            effect = (
                f"email {mail.email_id} undeliverable ({status_code}), the address flagged; {call}"
            )
        else:
            effect = f"noted on email {mail.email_id} ({status_code}); {call}"
        lines.append(f"mailbox message {mail.mail_id}: {mail.kind.value}: {effect}")
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
    from comms_tasks.ops.reports import activity_counts, describe_changes, status_snapshot

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
    kicks = [BATCH_REQUESTS, FOLLOW_UP_CHECK, POLL_MAILBOX] if batch_now else []
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
