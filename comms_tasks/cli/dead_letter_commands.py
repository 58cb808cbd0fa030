"""``comms dead-letters``: list, show (masked) and replay inbound messages that failed."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from comms_tasks.cli.shared import (
    USAGE_ERROR,
    JsonOption,
    _field,
    _iso,
    console,
    database,
    emit_json,
    errors,
    fail,
    mask,
    require_database,
)
from comms_tasks.local_time import local_text

dead_letters_app = typer.Typer(
    help="Inbound messages that failed validation.", no_args_is_help=True
)


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
    from comms_tasks.ops import listings

    with database() as session:
        found = listings.dead_letters(session, include_replayed=show_all, limit=limit)
        letters = [_letter_dict(letter) for letter in found]
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

    from comms_tasks.appliers import APPLIERS
    from comms_tasks.inbound.dead_letter_replay import NotReplayable, replay

    if bool(dead_letter_ids) == replay_all:
        raise fail("give dead letter ids or --all, not both or neither", code=USAGE_ERROR)
    if replay_all:
        from comms_tasks.ops.listings import replayable_dead_letter_ids

        with database() as session:
            dead_letter_ids = replayable_dead_letter_ids(session)
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
