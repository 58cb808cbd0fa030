"""``comms db``, ``comms contracts`` and ``comms purge-expired``: the schema, the contract
files, retention by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from comms_tasks.cli.shared import (
    JsonOption,
    _first_line,
    app,
    console,
    emit_json,
    errors,
    fail,
    require_database,
)
from comms_tasks.settings import get_settings

db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
contracts_app = typer.Typer(help="The JSON Schemas of the message contracts.", no_args_is_help=True)


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


@app.command("purge-expired")
def purge_expired_command(as_json: JsonOption = False) -> None:
    """Redact email bodies, dead letters, call notes and status reasons past the retention
    period now (beat does it nightly)."""
    from rich.progress import Progress

    from comms_tasks.models.base import utcnow
    from comms_tasks.privacy.retention import purge_all_expired

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
