"""A realistic, reproducible sample of the messages other services send us.

``comms demo`` loads demo data the way production data arrives: it sends the public
messages of the therapist service (``therapist.upserted``) and of the matching service
(``placement_request.created``) to our tasks, which validate and apply them like any other.

This module only *builds* those messages: it is pure (no I/O, no Celery) and deterministic
for a given seed and clock, event ids included, so sending the same sample twice is
deduplicated by the inbox. Every value is plain JSON (str, int, bool, None, list, dict).

The sample is shaped to exercise the service:

- therapists in every status, some without an email address, some without a phone or
  telephone office hours ("telefonische Sprechzeiten");
- patients who asked several therapists at once (never the same one twice);
- a few therapists with more open requests than fit in one email, many with a handful,
  some with a single one, and a few requests to therapists who are no longer active.

Patient names are not part of the contract and never appear here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import random
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from comms_tasks.contracts import EVENT_ARGUMENT
from comms_tasks.ops import demo_patients, demo_vocabulary
from comms_tasks.task_names import HANDLE_MATCHING_EVENT, HANDLE_THERAPIST_EVENT

# --- Message contract --------------------------------------------------------------

THERAPIST_UPSERTED = "therapist.upserted"
PLACEMENT_REQUEST_CREATED = "placement_request.created"
THERAPIST_PRODUCER = "therapist-service"
MATCHING_PRODUCER = "matching-service"
ENVELOPE_VERSION = 1

# --- Size and mix of the sample ----------------------------------------------------

DEFAULT_SEED = 20261129
DEFAULT_THERAPISTS = 30
DEFAULT_REQUESTS = 120

# How the default 30 therapists split; other sizes scale these counts down or up.
BLOCKED_THERAPISTS = 3
INACTIVE_THERAPISTS = 2
ACTIVE_WITHOUT_EMAIL = 2
ACTIVE_WITHOUT_PHONE = 3

# Who receives requests (per 30 therapists): a few "popular" therapists with more open
# requests than one email should carry, some with a single request, the other active
# therapists with a handful, and a few requests sent before a therapist stopped working.
HEAVY_THERAPISTS = 5
HEAVY_LOAD = (6, 9)
SINGLE_REQUEST_THERAPISTS = 2
SINGLE_LOAD = (1, 1)
REGULAR_LOAD = (2, 5)
NON_ACTIVE_WITH_REQUEST = 2
NON_ACTIVE_LOAD = (1, 1)

# Patients ask 1-4 therapists at once, two on average (about 60 patients for 120 requests).
MEAN_REQUESTS_PER_PATIENT = 2
MAX_REQUESTS_PER_PATIENT = 4
REQUESTS_PER_PATIENT_WEIGHTS = {1: 35, 2: 35, 3: 20, 4: 10}
# --- Time --------------------------------------------------------------------------

# The therapist service synced its profiles before the oldest request was created.
THERAPIST_SYNC_AGO = dt.timedelta(days=42)
THERAPIST_EVENT_GAP_SECONDS = (5, 120)
OLDEST_REQUEST_AGO = dt.timedelta(days=40)
NEWEST_REQUEST_AGO = dt.timedelta(days=1)
# A patient's requests are created within a few days of each other.
PATIENT_REQUEST_SPREAD = dt.timedelta(days=3)
# --- Therapist profiles ------------------------------------------------------------

NO_SALUTATION_SHARE = 0.07

MOBILE_SHARE = 0.15
MOBILE_DIGITS = 8
# Subscriber numbers are longer where area codes are shorter (Berlin: 7 digits).
LANDLINE_NUMBER_DIGITS = 9

Weekday = Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday"]
WORKDAYS: tuple[Weekday, ...] = ("monday", "tuesday", "wednesday", "thursday", "friday")
WEEKDAY_ORDER: tuple[Weekday, ...] = (*WORKDAYS, "saturday")
SATURDAY_SHARE = 0.05
# Telephone office hours: one to three short windows a week, between sessions.
WINDOWS_PER_WEEK_WEIGHTS = {1: 35, 2: 45, 3: 20}
WINDOW_STARTS = (
    "07:45", "08:00", "08:30", "09:00", "11:50", "12:00", "12:30",
    "13:00", "13:10", "14:00", "16:50", "17:00", "17:30", "18:00",
)  # fmt: skip
WINDOW_MINUTES = (25, 30, 30, 45, 50, 60)

# --- Patient summaries -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoMessage:
    """One message to send: ``send_task(task_name, kwargs=kwargs)``."""

    task_name: str
    kwargs: dict[str, Any]


def demo_messages(
    now: dt.datetime,
    *,
    seed: int = DEFAULT_SEED,
    therapists: int = DEFAULT_THERAPISTS,
    requests: int = DEFAULT_REQUESTS,
) -> list[DemoMessage]:
    """The demo sample as of ``now``: every therapist event first, then the requests."""
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if therapists < 1:
        raise ValueError("the sample needs at least one therapist")
    if requests < 0:
        raise ValueError("requests must not be negative")
    now = now.astimezone(dt.UTC).replace(microsecond=0)
    rng = random.Random(seed)  # noqa: S311 - demo data, reproducible on purpose

    # Distinct last names while they last, so that email addresses differ too.
    last_names = rng.sample(demo_vocabulary.LAST_NAMES, len(demo_vocabulary.LAST_NAMES))
    profiles = [
        therapist_profile(rng, therapist_id, last_names[(therapist_id - 1) % len(last_names)])
        for therapist_id in range(1, therapists + 1)
    ]
    _assign_statuses(rng, profiles)
    messages: list[DemoMessage] = []
    occurred_at = now - THERAPIST_SYNC_AGO
    for profile in profiles:
        occurred_at += dt.timedelta(seconds=rng.randint(*THERAPIST_EVENT_GAP_SECONDS))
        event = _envelope(rng, THERAPIST_UPSERTED, THERAPIST_PRODUCER, occurred_at, profile)
        messages.append(DemoMessage(HANDLE_THERAPIST_EVENT, {EVENT_ARGUMENT: event}))

    planned = _plan_requests(rng, now, profiles, requests)
    summaries = demo_patients._patient_summaries(rng, now, planned)
    for placement_request_id, request in enumerate(planned, start=1):
        payload = {
            "placement_request_id": placement_request_id,
            "patient_id": request.patient_id,
            "therapist_id": request.therapist_id,
            "created_at": request.created_at.isoformat(),
            "patient": dict(summaries[request.patient_id]),
        }
        event = _envelope(
            rng, PLACEMENT_REQUEST_CREATED, MATCHING_PRODUCER, request.created_at, payload
        )
        messages.append(DemoMessage(HANDLE_MATCHING_EVENT, {EVENT_ARGUMENT: event}))
    return messages


def _envelope(
    rng: random.Random,
    event_type: str,
    producer: str,
    occurred_at: dt.datetime,
    payload: dict[str, Any],
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "event_type": event_type,
        "version": ENVELOPE_VERSION,
        "occurred_at": occurred_at.isoformat(),
        "producer": producer,
        "payload": payload,
    }


# --- Therapists --------------------------------------------------------------------


def therapist_profile(rng: random.Random, therapist_id: int, last_name: str) -> dict[str, Any]:
    """An active therapist with email, phone and office hours (the mix comes later)."""
    female = rng.random() < len(demo_vocabulary.FEMALE_FIRST_NAMES) / (
        len(demo_vocabulary.FEMALE_FIRST_NAMES) + len(demo_vocabulary.MALE_FIRST_NAMES)
    )
    first_name = rng.choice(
        demo_vocabulary.FEMALE_FIRST_NAMES if female else demo_vocabulary.MALE_FIRST_NAMES
    )
    salutation: str | None = "Frau" if female else "Herr"
    if rng.random() < NO_SALUTATION_SHARE:
        salutation = None
    return {
        "therapist_id": therapist_id,
        "salutation": salutation,
        "title": demo_patients._weighted(rng, dict(demo_vocabulary.TITLES)),
        "first_name": first_name,
        "last_name": last_name,
        "email": _email(rng, first_name, last_name),
        "phone": _phone(rng),
        "phone_availability": _phone_availability(rng),
        "status": "active",
    }


def _ascii(name: str) -> str:
    return name.lower().translate(demo_vocabulary.TRANSLITERATION)


def _email(rng: random.Random, first_name: str, last_name: str) -> str:
    first, last = _ascii(first_name), _ascii(last_name)
    return rng.choice(demo_vocabulary.EMAIL_PATTERNS).format(
        first=first, initial=first[0], last=last
    )


def _phone(rng: random.Random) -> str:
    if rng.random() < MOBILE_SHARE:
        prefix, digits = rng.choice(demo_vocabulary.MOBILE_PREFIXES), MOBILE_DIGITS
    else:
        prefix = rng.choice(demo_vocabulary.LANDLINE_AREA_CODES)
        digits = LANDLINE_NUMBER_DIGITS - len(prefix)
    number = rng.randint(10 ** (digits - 1), 10**digits - 1)
    return f"+49 {prefix} {number}"


def _phone_availability(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """One to three short windows a week, on different days."""
    days = rng.sample(WORKDAYS, demo_patients._weighted(rng, WINDOWS_PER_WEEK_WEIGHTS))
    if rng.random() < SATURDAY_SHARE:
        days[-1] = "saturday"
    availability: dict[str, list[dict[str, str]]] = {}
    for day in sorted(days, key=WEEKDAY_ORDER.index):
        start = dt.datetime.strptime(rng.choice(WINDOW_STARTS), "%H:%M")
        end = start + dt.timedelta(minutes=rng.choice(WINDOW_MINUTES))
        availability[day] = [{"start": f"{start:%H:%M}", "end": f"{end:%H:%M}"}]
    return availability


def _scaled(count: int, therapists: int) -> int:
    """A count of the default sample, for a sample of ``therapists`` therapists."""
    return count * therapists // DEFAULT_THERAPISTS


def _assign_statuses(rng: random.Random, profiles: list[dict[str, Any]]) -> None:
    """Block, deactivate or strip contact data of randomly chosen therapists."""
    shuffled = rng.sample(profiles, len(profiles))
    total = len(profiles)
    groups = (
        (BLOCKED_THERAPISTS, {"status": "blocked"}),
        (INACTIVE_THERAPISTS, {"status": "inactive"}),
        (ACTIVE_WITHOUT_EMAIL, {"email": None}),
        (ACTIVE_WITHOUT_PHONE, {"phone": None, "phone_availability": None}),
    )
    for count, changes in groups:
        for _ in range(_scaled(count, total)):
            shuffled.pop().update(changes)


# --- Placement requests ------------------------------------------------------------


def _plan_requests(
    rng: random.Random, now: dt.datetime, profiles: Sequence[dict[str, Any]], requests: int
) -> list[demo_patients._Request]:
    """Who asks whom and when, in the order the requests were created."""
    if requests == 0:
        return []
    loads = _therapist_loads(rng, profiles)
    max_per_patient = min(MAX_REQUESTS_PER_PATIENT, len(loads))
    patients = max(
        round(requests / MEAN_REQUESTS_PER_PATIENT), math.ceil(requests / max_per_patient)
    )
    demands = [demo_patients._weighted(rng, REQUESTS_PER_PATIENT_WEIGHTS) for _ in range(patients)]
    # Always fits: patients <= requests <= patients * max_per_patient.
    _fit_total(rng, demands, requests, [(1, max_per_patient)] * patients)

    planned: list[demo_patients._Request] = []
    oldest, newest = now - OLDEST_REQUEST_AGO, now - NEWEST_REQUEST_AGO
    for patient_index, therapist_ids in enumerate(_assign(rng, demands, loads)):
        first = _random_time(rng, oldest, newest)
        last = min(first + PATIENT_REQUEST_SPREAD, newest)
        for position, therapist_id in enumerate(therapist_ids):
            created_at = first if position == 0 else _random_time(rng, first, last)
            planned.append(demo_patients._Request(patient_index + 1, therapist_id, created_at))
    planned.sort(key=lambda r: (r.created_at, r.patient_id, r.therapist_id))
    return planned


def _assign(
    rng: random.Random, demands: Sequence[int], loads: dict[int, tuple[int, int]]
) -> list[list[int]]:
    """For each patient, the different therapists it asks; each therapist within its load."""
    requests, patients = sum(demands), len(demands)
    # A therapist hears from a patient once at most.
    bands = [(min(low, patients), min(high, patients)) for low, high in loads.values()]
    counts = [rng.randint(low, high) for low, high in bands]
    if _fit_total(rng, counts, requests, bands):
        assignment = _match(rng, demands, dict(zip(loads, counts, strict=True)))
        if assignment is not None:
            return assignment
    # Sizes far from the default: an even spread, which every set of demands fits.
    even = _even_split(rng, requests, len(loads))
    assignment = _match(rng, demands, dict(zip(loads, even, strict=True)))
    if assignment is None:
        raise ValueError("cannot spread these requests over these therapists")
    return assignment


def _therapist_loads(
    rng: random.Random, profiles: Sequence[dict[str, Any]]
) -> dict[int, tuple[int, int]]:
    """Therapist id -> (fewest, most) requests it should receive, for those who receive any."""
    total = len(profiles)
    active = [p["therapist_id"] for p in profiles if p["status"] == "active"]
    others = [p["therapist_id"] for p in profiles if p["status"] != "active"]
    rng.shuffle(active)
    heavy = _scaled(HEAVY_THERAPISTS, total)
    single = _scaled(SINGLE_REQUEST_THERAPISTS, total)
    loads: dict[int, tuple[int, int]] = {}
    for index, therapist_id in enumerate(active):
        if index < heavy:
            loads[therapist_id] = HEAVY_LOAD
        elif index < heavy + single:
            loads[therapist_id] = SINGLE_LOAD
        else:
            loads[therapist_id] = REGULAR_LOAD
    for therapist_id in rng.sample(
        others, min(len(others), _scaled(NON_ACTIVE_WITH_REQUEST, total))
    ):
        loads[therapist_id] = NON_ACTIVE_LOAD
    return dict(sorted(loads.items()))


def _fit_total(
    rng: random.Random, values: list[int], total: int, bounds: Sequence[tuple[int, int]]
) -> bool:
    """Nudge ``values`` one step at a time, within ``bounds``, until they sum to ``total``."""
    values[:] = [
        min(max(value, low), high) for value, (low, high) in zip(values, bounds, strict=True)
    ]
    while (gap := total - sum(values)) != 0:
        step = 1 if gap > 0 else -1
        movable = [
            index for index, (low, high) in enumerate(bounds) if low <= values[index] + step <= high
        ]
        if not movable:
            return False
        values[rng.choice(movable)] += step
    return True


def _even_split(rng: random.Random, total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` that differ by one at most, the larger ones at random."""
    base, extra = divmod(total, parts)
    counts = [base] * parts
    for index in rng.sample(range(parts), extra):
        counts[index] += 1
    return counts


def _match(
    rng: random.Random, demands: Sequence[int], capacity: dict[int, int]
) -> list[list[int]] | None:
    """For each patient, ``demands[i]`` different therapists, filling every ``capacity``.

    Patients asking most go first, each to the therapists with the most room left (ties
    broken at random): this greedy finds an assignment whenever one exists (Gale-Ryser),
    and None means there is none.
    """
    remaining = dict(capacity)
    chosen: list[list[int]] = [[] for _ in demands]
    for patient in sorted(range(len(demands)), key=lambda p: -demands[p]):
        candidates = [t for t, room in remaining.items() if room > 0]
        rng.shuffle(candidates)
        candidates.sort(key=lambda t: -remaining[t])
        picked = candidates[: demands[patient]]
        if len(picked) < demands[patient]:
            return None
        for therapist_id in picked:
            remaining[therapist_id] -= 1
        chosen[patient] = picked
    return chosen


def _random_time(rng: random.Random, earliest: dt.datetime, latest: dt.datetime) -> dt.datetime:
    seconds = int((latest - earliest).total_seconds())
    return earliest + dt.timedelta(seconds=rng.randint(0, seconds))


# --- Patients ----------------------------------------------------------------------
