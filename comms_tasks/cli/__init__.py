"""``comms``: the operators' command line.

Tables for people, ``--json`` for scripts. Bad arguments and unknown ids end with a
one-line reason on stderr and a non-zero exit. One module per command group; this one
puts them together and runs them.
"""

from __future__ import annotations

import os

import typer
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.exc import SQLAlchemyError
from typer.exceptions import TyperException

from comms_tasks.cli import (
    call_commands,
    db_commands,
    dead_letter_commands,
    email_commands,
    explain_commands,
    mailbox_commands,
    run_commands,
    status_commands,
)
from comms_tasks.cli.shared import ABORTED, USAGE_ERROR, app, broker_unreachable, say_error
from comms_tasks.settings import ConfigurationError, get_settings

app.add_typer(call_commands.calls_app, name="calls")
app.add_typer(email_commands.emails_app, name="emails")
app.add_typer(explain_commands.explain_app, name="explain")
app.add_typer(explain_commands.preview_app, name="preview")
app.add_typer(db_commands.db_app, name="db")
app.add_typer(dead_letter_commands.dead_letters_app, name="dead-letters")
app.add_typer(db_commands.contracts_app, name="contracts")
app.add_typer(mailbox_commands.mailbox_app, name="mailbox")
# The root's own commands (purge-expired, status, demo, run) are registered by importing
# their modules above.
__all__ = ["app", "main", "run_commands", "status_commands"]


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
