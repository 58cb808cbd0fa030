"""``comms status``: one screen of how the service is doing."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from comms_tasks.cli.shared import JsonOption, app, console, database, emit_json
from comms_tasks.local_time import local_text

# --- status --------------------------------------------------------------------------


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Counts per status, the oldest queued email, the outbox backlog, dead letters."""
    from comms_tasks.ops.reports import status_snapshot

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
