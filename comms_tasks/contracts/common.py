"""Building blocks shared by every message: strict models, safe strings, availability."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

# Free text shown to a therapist may be long, but not unbounded: a message is not a file.
MAX_TEXT = 5000
MAX_NAME = 200


class Contract(BaseModel):
    """Every contract model: unknown keys are rejected, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _single_line(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("must not contain a line break")
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError("must not contain control characters")
    return value


_ADDRESS = re.compile(
    r"^[^@\s<>(),;:\"\[\]\\]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$"
)


def _email_address(value: str) -> str:
    _single_line(value)
    if not _ADDRESS.match(value):
        raise ValueError("is not a valid email address")
    return value


SingleLine = Annotated[str, StringConstraints(max_length=MAX_NAME), AfterValidator(_single_line)]
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_NAME), AfterValidator(_single_line)
]
EmailAddress = Annotated[
    str,
    StringConstraints(min_length=3, max_length=254),
    AfterValidator(_email_address),
]


def _storable_text(value: str) -> str:
    # PostgreSQL cannot store NUL in text or JSON: refuse it here, with the field named.
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


FreeText = Annotated[str, StringConstraints(max_length=MAX_TEXT), AfterValidator(_storable_text)]
Id = Annotated[int, Field(ge=1, le=2**63 - 1)]

PlacementRequestStatusValue = Literal["open", "in_progress", "accepted", "rejected", "cancelled"]
OutcomeValue = Literal["accepted", "rejected", "needs_follow_up"]

# --- Availability: {"monday": [{"start": "09:00", "end": "12:00"}, ...], ...} ---------

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
Weekday = Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
ClockTime = Annotated[str, StringConstraints(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
# A day holds a handful of windows; more is a broken producer, not a busy therapist.
MAX_WINDOWS_PER_DAY = 48


class TimeWindow(Contract):
    start: ClockTime
    end: ClockTime

    @model_validator(mode="after")
    def _end_after_start(self) -> TimeWindow:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self

    @property
    def start_time(self) -> dt.time:
        return dt.time.fromisoformat(self.start)

    @property
    def end_time(self) -> dt.time:
        return dt.time.fromisoformat(self.end)


def _merge_windows(
    availability: dict[Weekday, list[TimeWindow]],
) -> dict[Weekday, list[TimeWindow]]:
    """Sort each day's windows and merge the ones that overlap or touch."""
    merged: dict[Weekday, list[TimeWindow]] = {}
    day: Weekday
    for day in WEEKDAYS:  # type: ignore[assignment]
        windows = availability.get(day)
        if windows is None:
            continue
        result: list[TimeWindow] = []
        for window in sorted(windows, key=lambda w: (w.start, w.end)):
            if result and window.start <= result[-1].end:
                last = result[-1]
                result[-1] = TimeWindow(start=last.start, end=max(last.end, window.end))
            else:
                result.append(window)
        merged[day] = result
    return merged


Availability = Annotated[
    dict[Weekday, Annotated[list[TimeWindow], Field(max_length=MAX_WINDOWS_PER_DAY)]],
    AfterValidator(_merge_windows),
]


def availability_to_json(availability: dict[Weekday, list[TimeWindow]] | None) -> dict | None:
    """The stored form: plain JSON, merged and sorted."""
    if availability is None:
        return None
    return {
        day: [{"start": w.start, "end": w.end} for w in windows]
        for day, windows in availability.items()
    }
