"""Checks commands share: the therapist they name is known, the requests they name are
its own."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from comms_tasks.contracts import Rejected
from comms_tasks.models import PlacementRequest, Therapist


def known_therapist(session: Session, therapist_id: int, command_id: str) -> Therapist:
    """The therapist a command names, or the command is rejected."""
    therapist = session.get(Therapist, therapist_id)
    if therapist is None or therapist.deleted_at is not None:
        raise Rejected("command.therapist_id: unknown therapist", command_id)
    return therapist


def check_requests_of(
    session: Session, therapist_id: int, request_ids: Sequence[int], command_id: str
) -> None:
    """Every id names a distinct request of this therapist, or the command is rejected."""
    owners = dict(
        session.execute(
            select(PlacementRequest.id, PlacementRequest.therapist_id).where(
                PlacementRequest.id.in_(list(request_ids))
            )
        ).all()
    )
    for index, request_id in enumerate(request_ids):
        if owners.get(request_id) != therapist_id:
            raise Rejected(
                f"command.placement_request_ids[{index}]: unknown request of this therapist",
                command_id,
            )
    if len(set(request_ids)) != len(request_ids):
        raise Rejected("command.placement_request_ids: contains duplicates", command_id)
