"""A fresh PostgreSQL database with the read models the stages work on (not timed)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Engine, insert

from comms_tasks.migrate import recreate_database, upgrade
from comms_tasks.models import (
    Patient,
    PlacementRequest,
    PlacementRequestStatus,
    Therapist,
    TherapistStatus,
)
from comms_tasks.ops import demo, demo_patients, demo_vocabulary

ROWS_PER_INSERT = 5_000
REQUEST_AGE = dt.timedelta(days=30)
SEED = 20261129


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    therapists: int
    requests: int
    calls: tuple[int, int]
    # The mailbox stage: messages in the Maildir, and COMMS_MAILBOX_BATCH (one poll's).
    mails: int = 10_000
    mail_batch: int = 1_000

    @property
    def emails(self) -> int:
        return self.therapists


def fresh_database(url: str) -> None:
    """Drop and create the database ``url`` names, then migrate it to the head."""
    recreate_database(url)
    upgrade(url)


def _chunks(rows: Sequence[dict[str, Any]]) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(rows), ROWS_PER_INSERT):
        yield rows[start : start + ROWS_PER_INSERT]


def read_model_rows(size: Size, now: dt.datetime) -> dict[type, list[dict[str, Any]]]:
    """Active therapists with email, phone and office hours; patients asking two each.

    Request ``r`` goes to therapist ``r % therapists + 1``, so every therapist has
    ``requests / therapists`` open requests; patient ``r // 2 + 1`` asks two therapists.
    """
    rng = random.Random(SEED)
    therapists = []
    for therapist_id in range(1, size.therapists + 1):
        profile = demo.therapist_profile(
            rng,
            therapist_id,
            demo_vocabulary.LAST_NAMES[therapist_id % len(demo_vocabulary.LAST_NAMES)],
        )
        profile["id"] = profile.pop("therapist_id")
        profile["email"] = f"t{therapist_id}.{profile['email']}"
        profile["status"] = TherapistStatus(profile["status"])
        therapists.append({**profile, "last_event_at": now - REQUEST_AGE})
    patients: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    for index in range(size.requests):
        patient_id = index // 2 + 1
        created_at = now - REQUEST_AGE + dt.timedelta(seconds=index)
        if len(patients) < patient_id:
            summary = demo_patients.patient_summary(rng, now)
            registered_on = (created_at - dt.timedelta(days=rng.randint(1, 120))).date()
            patients.append(
                {"id": patient_id, "registered_on": registered_on, "summary_event_at": created_at}
                | summary
            )
        requests.append(
            {
                "id": index + 1,
                "patient_id": patient_id,
                "therapist_id": index % size.therapists + 1,
                "status": PlacementRequestStatus.OPEN,
                "created_at": created_at,
                "last_event_at": created_at,
            }
        )
    return {Therapist: therapists, Patient: patients, PlacementRequest: requests}


def seed(engine: Engine, rows: dict[type, list[dict[str, Any]]]) -> None:
    with engine.begin() as connection:
        for model, model_rows in rows.items():
            for chunk in _chunks(model_rows):
                connection.execute(insert(model), chunk)
