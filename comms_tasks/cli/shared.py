"""What every ``comms`` command shares: the root app, the console, errors, the database and
the broker. Imports settings and db only; the command modules import it."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import sys
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.segment import Segment
from rich.text import Text
from sqlalchemy.orm import Session

from comms_tasks.inbound import masking
from comms_tasks.local_time import local_iso, local_text
from comms_tasks.settings import get_settings

app = typer.Typer(
    help="Operate the communication service: status, dead letters, demo, database.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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

# Keys whose values are ids or vocabulary (comms_tasks.inbound.dead_letters.VISIBLE_KEYS): every
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
    from comms_tasks.privacy.task_reprs import identifying_repr

    argsrepr, kwargsrepr = identifying_repr([], kwargs)
    celery_app.send_task(
        task_name, kwargs=kwargs, argsrepr=argsrepr, kwargsrepr=kwargsrepr, **options
    )


# --- dead letters --------------------------------------------------------------------


def mask(value: Any, *, visible: bool = False) -> Any:
    """The message with every value that is not a known id or vocabulary replaced by ***."""

    if isinstance(value, dict):
        return {key: mask(item, visible=key in masking.VISIBLE_KEYS) for key, item in value.items()}
    if isinstance(value, list):
        return [mask(item, visible=visible) for item in value]
    if value is None or visible:
        return value
    return MASK


# --- calls ---------------------------------------------------------------------------

DateOption = Annotated[
    str | None, typer.Option("--date", help="The local day, YYYY-MM-DD (default: today).")
]


def _field(key: str, value: Any) -> Text:
    """``key: value``, the key in bold; the value as written, whatever brackets it holds.

    A time (``*_at``, held as ISO) is shown in local time with its zone, to the second.
    """
    if key.endswith("_at") and isinstance(value, str) and value:
        value = local_text(value, seconds=True)
    return Text.assemble((key, "bold"), f": {value}" if value != "" else ":")


# A call's request that was talked about without an outcome (``--request 17=discussed``).
DISCUSSED = "discussed"


def request_outcomes(items: list[str] | None, *, discussed: bool) -> list[tuple[int, str | None]]:
    """``--request REQUEST_ID=OUTCOME`` options, each as (id, outcome or None if discussed).

    The outcomes are the contract's (:class:`ResponseOutcome`); a call's may also be
    ``discussed``. Anything else ends the command in one line naming the option.
    """
    from comms_tasks.models import ResponseOutcome

    allowed = {outcome.value for outcome in ResponseOutcome} | ({DISCUSSED} if discussed else set())
    parsed: list[tuple[int, str | None]] = []
    for item in items or []:
        request_id, _, outcome = item.partition("=")
        if not request_id.isdigit() or outcome not in allowed:
            raise fail(f"--request: {item!r} is not REQUEST_ID=OUTCOME", code=USAGE_ERROR)
        parsed.append((int(request_id), None if outcome == DISCUSSED else outcome))
    return parsed
