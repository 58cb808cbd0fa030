"""Building blocks shared by every message: strict models, safe strings, availability."""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic_core import PydanticCustomError

from comms_tasks.contracts.limits import MAX_EMAIL, MAX_ID, MAX_NAME, MAX_TEXT, MAX_YEAR, MIN_YEAR


class Contract(BaseModel):
    """Every contract model: unknown keys are rejected, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# The error type of :func:`field_error`: its ``loc`` is appended to the error's own.
FIELD_ERROR = "contract_field"


def field_error(loc: tuple[int | str, ...], message: str) -> PydanticCustomError:
    """An error of a model validator that names a field inside the model, not the model.

    ``describe`` (contracts/__init__.py) appends ``loc`` to where pydantic says the error
    is: ``command.outcomes[2].placement_request_id``, not ``command``.
    """
    return PydanticCustomError(FIELD_ERROR, message, {"loc": loc})


# Line and paragraph separators besides CR and LF: NEL (a C1 control), U+2028, U+2029.
_LINE_BREAKS = frozenset("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
# An RFC 2047 encoded word, or anything a lenient decoder might take for one: the email
# package decodes them in header values and writes a CR/LF they hold back as it is.
ENCODED_WORD = re.compile(r"=\?.*\?=", re.DOTALL)
# Unicode categories of characters that have no place in a header: controls, line and
# paragraph separators (the header writer checks them too, mail/message.py).
UNSAFE_CATEGORIES = ("Cc", "Zl", "Zp")


def _single_line(value: str) -> str:
    """``value`` if it can never become more than one header line, whatever reads it."""
    if any(char in _LINE_BREAKS for char in value):
        raise ValueError("must not contain a line break")
    if any(unicodedata.category(char) in UNSAFE_CATEGORIES for char in value):
        raise ValueError("must not contain control characters")
    if ENCODED_WORD.search(value):
        raise ValueError("must not contain an encoded word (=?...?=)")
    return value


_ADDRESS = re.compile(
    r"^[^@\s<>(),;:\"\[\]\\]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$"
)


def _email_address(value: str) -> str:
    _single_line(value)
    if not value.isascii():
        # Mail to a non-ASCII local part needs SMTPUTF8, which we do not use: every email
        # to it would fail for good. (A non-ASCII domain fails the pattern below too.)
        raise ValueError("must be an ASCII address (internationalised ones are not supported)")
    if not _ADDRESS.match(value):
        raise ValueError("is not a valid email address")
    return value


SingleLine = Annotated[str, StringConstraints(max_length=MAX_NAME), AfterValidator(_single_line)]
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_NAME), AfterValidator(_single_line)
]
EmailAddress = Annotated[
    str,
    StringConstraints(min_length=3, max_length=MAX_EMAIL),
    AfterValidator(_email_address),
]


# Free text may span lines and hold tabs; no other control character has a place in it
# (ESC would drive an operator's terminal, C1 controls likewise).
_TEXT_CONTROLS = frozenset(chr(c) for c in (*range(32), *range(127, 160))) - set("\t\n\r")


def _storable_text(value: str) -> str:
    # PostgreSQL cannot store NUL in text or JSON: refuse it here, with the field named.
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    if not _TEXT_CONTROLS.isdisjoint(value):
        raise ValueError("must not contain control characters other than tab and line breaks")
    return value


FreeText = Annotated[str, StringConstraints(max_length=MAX_TEXT), AfterValidator(_storable_text)]
Id = Annotated[int, Field(ge=1, le=MAX_ID)]


_DateOrTime = TypeVar("_DateOrTime", dt.date, dt.datetime)


def _in_year_range(value: _DateOrTime) -> _DateOrTime:
    # On the value as given: its UTC form may be a day off, which still converts.
    if not MIN_YEAR <= value.year <= MAX_YEAR:
        raise ValueError(f"must be between the years {MIN_YEAR} and {MAX_YEAR}")
    return value


# An instant with its offset, and a calendar day, both in the years MIN_YEAR..MAX_YEAR.
Instant = Annotated[AwareDatetime, AfterValidator(_in_year_range)]
Day = Annotated[dt.date, AfterValidator(_in_year_range)]

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
