"""A therapist's phone availability read into windows per weekday, and the public
holidays of the configured state."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import holidays as holiday_calendars

from comms_tasks.rules.slots import HOLIDAY_COUNTRY, WEEKDAY_NUMBERS, Window


def parse_availability(data: Mapping[str, Any] | None) -> dict[int, list[Window]]:
    """The stored availability JSON as weekday number (Monday = 0) -> sorted, merged windows.

    The JSON was validated when it arrived; anything unexpected here is a bug upstream and
    raises ``ValueError`` naming the key rather than silently dropping a therapist's hours.
    """
    if not data:
        return {}
    parsed: dict[int, list[Window]] = {}
    for day, windows in data.items():
        if day not in WEEKDAY_NUMBERS:
            raise ValueError(f"availability: unknown weekday {day!r}")
        day_windows: list[Window] = []
        for window in windows:
            try:
                start = dt.time.fromisoformat(window["start"])
                end = dt.time.fromisoformat(window["end"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"availability.{day}: bad window") from exc
            if end <= start:
                raise ValueError(f"availability.{day}: end must be after start")
            day_windows.append((start, end))
        if day_windows:
            parsed[WEEKDAY_NUMBERS[day]] = _merged(day_windows)
    return parsed


def _merged(windows: Sequence[Window]) -> list[Window]:
    """Sorted, with overlapping or touching windows joined (the rule the contract applies)."""
    result: list[Window] = []
    for start, end in sorted(windows):
        if result and start <= result[-1][1]:
            result[-1] = (result[-1][0], max(result[-1][1], end))
        else:
            result.append((start, end))
    return result


class Holidays:
    """Public holidays in Germany (and one state), as a fast ``date in holidays`` check.

    Each year is computed once, the first time a date of it is asked about.
    """

    def __init__(self, state: str | None = None) -> None:
        self.state = state
        # Built now so that an unknown state fails at start-up, not at the first booking.
        holiday_calendars.country_holidays(HOLIDAY_COUNTRY, subdiv=state)
        self._by_year: dict[int, frozenset[dt.date]] = {}

    def __contains__(self, day: object) -> bool:
        if isinstance(day, dt.datetime):
            day = day.date()
        if not isinstance(day, dt.date):
            return False
        dates = self._by_year.get(day.year)
        if dates is None:
            calendar = holiday_calendars.country_holidays(
                HOLIDAY_COUNTRY, subdiv=self.state, years=day.year
            )
            dates = frozenset(calendar.keys())
            self._by_year[day.year] = dates
        return day in dates

    def __repr__(self) -> str:
        return f"Holidays(state={self.state!r})"
