"""The demo's patients: their requests' shape and the summaries sent with them (invented,
plausible, never real). Helpers for weighted choices."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Sequence
from typing import Any, TypeVar

from comms_tasks.ops import demo_vocabulary


@dataclasses.dataclass(frozen=True)
class _Request:
    patient_id: int
    therapist_id: int
    created_at: dt.datetime


GROUP_THERAPY_SHARE = 0.4


REGISTERED_DAYS_BEFORE_FIRST_REQUEST = (1, 120)


MISSING_REGISTRATION_SHARE = 0.05


T = TypeVar("T")


def _weighted(rng: random.Random, weights: dict[T, int]) -> T:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


GENDER_WEIGHTS = {"weiblich": 60, "männlich": 35, "divers": 5}


SYMPTOMS_MONTHS = (3, 18)


MAX_YEARS_AGO = 7


def _patient_summaries(
    rng: random.Random, now: dt.datetime, planned: Sequence[_Request]
) -> dict[int, dict[str, Any]]:
    """Patient id -> the summary sent with each of the patient's requests."""
    first_request: dict[int, dt.datetime] = {}
    for request in planned:
        first_request.setdefault(request.patient_id, request.created_at)
    patient_ids = sorted(first_request)
    unregistered = rng.sample(patient_ids, round(len(patient_ids) * MISSING_REGISTRATION_SHARE))
    summaries: dict[int, dict[str, Any]] = {}
    for patient_id in patient_ids:
        summary = patient_summary(rng, now)
        if patient_id not in unregistered:
            days_before = rng.randint(*REGISTERED_DAYS_BEFORE_FIRST_REQUEST)
            registered_on = first_request[patient_id].date() - dt.timedelta(days=days_before)
            summary = {"registered_on": registered_on.isoformat(), **summary}
        elif unregistered.index(patient_id) % 2:
            # Producers may send an optional field as null or leave it out: both occur.
            summary = {"registered_on": None, **summary}
        summaries[patient_id] = summary
    return summaries


def patient_summary(rng: random.Random, now: dt.datetime) -> dict[str, Any]:
    diagnosis = rng.choice(list(demo_vocabulary.COMPLAINTS_BY_DIAGNOSIS))
    return {
        "diagnosis": diagnosis,
        "gender": _weighted(rng, GENDER_WEIGHTS),
        "time_availability": rng.choice(demo_vocabulary.TIME_AVAILABILITY),
        "symptoms_since": _symptoms_since(rng, now),
        "open_to_group_therapy": rng.random() < GROUP_THERAPY_SHARE,
        "therapy_experience": _therapy_experience(rng, now),
        "current_complaints": rng.choice(demo_vocabulary.COMPLAINTS_BY_DIAGNOSIS[diagnosis]),
    }


def _symptoms_since(rng: random.Random, now: dt.datetime) -> str:
    choices = (
        f"seit etwa {rng.randint(*SYMPTOMS_MONTHS)} Monaten",
        f"seit {rng.choice(demo_vocabulary.SEASONS)} {now.year - 1}",
        "seit über einem Jahr",
        "seit mehreren Jahren, verstärkt seit dem letzten Winter",
    )
    return rng.choice(choices)


def _therapy_experience(rng: random.Random, now: dt.datetime) -> str:
    years = {f"y{ago}": now.year - ago for ago in range(1, MAX_YEARS_AGO + 1)}
    return rng.choice(demo_vocabulary.THERAPY_EXPERIENCE).format(**years)
