"""``comms explain`` and ``comms preview``: why a therapist is (not) emailed, and what the
next batch would send."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from comms_tasks.cli.shared import JsonOption, console, database, emit_json, errors, fail
from comms_tasks.settings import get_settings

explain_app = typer.Typer(help="Why the service does what it does.", no_args_is_help=True)
preview_app = typer.Typer(
    help="What the service would do next, without doing it.", no_args_is_help=True
)


# --- explain and preview ---------------------------------------------------------------


def _preview(therapist_id: int) -> Any:
    """What the next batch would do for the therapist, computed and rolled back."""
    from comms_tasks.emails.weekly import preview_batch
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
