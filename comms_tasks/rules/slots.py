"""Pure rules of call booking: a therapist's availability -> free call slots.

Plain values in, plain values out: no database, no clock, no settings. ``comms.schedule_calls``,
``comms.schedule_call`` and the retry of failed calls all book with these functions.

Availability windows are local wall-clock times; everything else is arithmetic on UTC
instants. A local wall time is turned into the instants it names (none inside a
spring-forward gap, two inside an autumn fold) and every check is made on those instants.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import heapq
import zoneinfo
from collections.abc import Iterator, Mapping, Sequence

from comms_tasks.contracts.common import WEEKDAYS
from comms_tasks.rules import office_hours

HOLIDAY_COUNTRY = "DE"
WEEKDAY_NUMBERS = {name: number for number, name in enumerate(WEEKDAYS)}
UNIX_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# The finest step of datetime: the last instant of a half-open interval [start, end).
INSTANT = dt.timedelta(microseconds=1)
ONE_DAY = dt.timedelta(days=1)

Window = tuple[dt.time, dt.time]
# A window as offsets from local midnight, which the slot grid is counted from.
_DayWindow = tuple[dt.timedelta, dt.timedelta]


@dataclasses.dataclass(frozen=True)
class SlotRules:
    """Where a call may go; built from the settings by the caller."""

    zone: zoneinfo.ZoneInfo
    # The earliest start is now + lead_time.
    lead_time: dt.timedelta
    # The call must end by now + horizon.
    horizon: dt.timedelta
    # The slot grid (local wall times counted from midnight) and the unit of operator capacity.
    block: dt.timedelta
    duration: dt.timedelta
    # At most this many calls overlap any one block, across all therapists.
    calls_per_slot: int
    # German state code for the `holidays` package; None means national holidays only.
    holiday_state: str | None = None

    def __post_init__(self) -> None:
        if self.block <= dt.timedelta(0):
            raise ValueError("block must be positive")
        if self.duration <= dt.timedelta(0):
            raise ValueError("duration must be positive")
        if self.lead_time < dt.timedelta(0):
            raise ValueError("lead_time must not be negative")
        if self.horizon <= dt.timedelta(0):
            raise ValueError("horizon must be positive")
        if self.calls_per_slot < 1:
            raise ValueError("calls_per_slot must be at least 1")


class BookedCalls:
    """Index of live (scheduled) calls for fast checks; never scan all calls per candidate.

    Per therapist: call starts and ends, sorted by start, searched with ``bisect``. Per
    capacity block (``floor((t - epoch) / block)`` in UTC): how many calls touch it.
    """

    def __init__(self, block: dt.timedelta) -> None:
        if block <= dt.timedelta(0):
            raise ValueError("block must be positive")
        self.block = block
        self._starts: dict[int, list[dt.datetime]] = {}
        self._ends: dict[int, list[dt.datetime]] = {}
        # The longest call of each therapist bounds how far back an overlapping call can start.
        self._longest: dict[int, dt.timedelta] = {}
        self._per_block: dict[int, int] = {}
        self._count = 0

    def add(self, therapist_id: int, start: dt.datetime, end: dt.datetime) -> None:
        """Book [start, end) for the therapist; any alignment, aware datetimes."""
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("call times must be timezone-aware")
        if end <= start:
            raise ValueError("a call must end after it starts")
        start, end = start.astimezone(dt.UTC), end.astimezone(dt.UTC)
        starts = self._starts.setdefault(therapist_id, [])
        ends = self._ends.setdefault(therapist_id, [])
        position = bisect.bisect_right(starts, start)
        starts.insert(position, start)
        ends.insert(position, end)
        longest = self._longest.get(therapist_id, dt.timedelta(0))
        self._longest[therapist_id] = max(longest, end - start)
        for block in self._blocks(start, end):
            self._per_block[block] = self._per_block.get(block, 0) + 1
        self._count += 1

    def therapist_is_free(self, therapist_id: int, start: dt.datetime, end: dt.datetime) -> bool:
        """No call of the therapist overlaps [start, end); touching ends do not overlap."""
        starts = self._starts.get(therapist_id)
        if not starts or end <= start:
            return True
        ends = self._ends[therapist_id]
        # Only calls starting in (start - longest, end) can reach into [start, end).
        first = bisect.bisect_right(starts, start - self._longest[therapist_id])
        last = bisect.bisect_left(starts, end, lo=first)
        return all(ends[index] <= start for index in range(first, last))

    def has_room(
        self, therapist_id: int, start: dt.datetime, end: dt.datetime, calls_per_slot: int
    ) -> bool:
        """The therapist is free for [start, end) and every block it touches has room."""
        return (
            self.therapist_is_free(therapist_id, start, end)
            and self.load(start, end) < calls_per_slot
        )

    def load(self, start: dt.datetime, end: dt.datetime) -> int:
        """The most calls touching any one capacity block that [start, end) touches."""
        blocks = self._blocks(start, end)
        if len(blocks) == 1:  # the usual case: a call on the grid, one block long
            return self._per_block.get(blocks[0], 0)
        return max((self._per_block.get(block, 0) for block in blocks), default=0)

    def __len__(self) -> int:
        return self._count

    def _blocks(self, start: dt.datetime, end: dt.datetime) -> range:
        if end <= start:
            return range(0)
        first = (start - UNIX_EPOCH) // self.block
        last = (end - INSTANT - UNIX_EPOCH) // self.block
        return range(first, last + 1)


def free_slots(
    therapist_id: int,
    availability: Mapping[int, Sequence[Window]],
    booked: BookedCalls,
    now: dt.datetime,
    rules: SlotRules,
    holidays: office_hours.Holidays,
    *,
    not_before: dt.datetime | None = None,
    horizon_from: dt.datetime | None = None,
) -> Iterator[dt.datetime]:
    """UTC starts of the therapist's free slots, earliest first, computed lazily.

    A slot starts at a local wall time on the block grid (counted from local midnight) at or
    after a window's start, on a day that is no public holiday; every instant of the call
    shows a local time inside that window; it starts no earlier than ``now + lead_time``
    (and ``not_before``) and ends by ``now + horizon`` (by ``horizon_from + horizon`` when
    that is later: a search that starts in the future looks a horizon's length from there);
    it overlaps no call of the therapist, and every block it touches has room for one more
    call.
    """
    now = _as_utc(now, "now")
    earliest = now + rules.lead_time
    if not_before is not None:
        earliest = max(earliest, _as_utc(not_before, "not_before"))
    horizon_start = now if horizon_from is None else max(now, _as_utc(horizon_from, "horizon_from"))
    latest_end = horizon_start + rules.horizon
    if earliest + rules.duration > latest_end:
        return
    candidates = _candidates(
        _day_windows(availability),
        earliest.astimezone(rules.zone).date(),
        latest_end.astimezone(rules.zone).date(),
        earliest,
        rules,
        holidays,
    )
    # Wall times come in increasing order, but in an autumn fold the instants they name go
    # back in time: found slots wait here until no later wall time can name an earlier one.
    # Distinct wall times name distinct instants, so nothing is found twice.
    pending: list[dt.datetime] = []
    for lower_bound, starts in candidates:
        while pending and pending[0] < lower_bound:
            yield heapq.heappop(pending)
        if lower_bound + rules.duration > latest_end:
            break
        for start in starts:
            end = start + rules.duration
            if (
                start >= earliest
                and end <= latest_end
                and booked.has_room(therapist_id, start, end, rules.calls_per_slot)
            ):
                heapq.heappush(pending, start)
    while pending:
        yield heapq.heappop(pending)


def first_free_slot(
    therapist_id: int,
    availability: Mapping[int, Sequence[Window]],
    booked: BookedCalls,
    now: dt.datetime,
    rules: SlotRules,
    holidays: office_hours.Holidays,
    *,
    not_before: dt.datetime | None = None,
    horizon_from: dt.datetime | None = None,
) -> dt.datetime | None:
    """The earliest free slot (UTC), or None when there is none within the horizon."""
    slots = free_slots(
        therapist_id,
        availability,
        booked,
        now,
        rules,
        holidays,
        not_before=not_before,
        horizon_from=horizon_from,
    )
    return next(slots, None)


def _as_utc(moment: dt.datetime, name: str) -> dt.datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return moment.astimezone(dt.UTC)


def _day_windows(availability: Mapping[int, Sequence[Window]]) -> dict[int, list[_DayWindow]]:
    """Windows per weekday as offsets from local midnight, sorted and merged.

    Merging keeps the wall times visited in increasing order, which the ordering relies on.
    """
    result: dict[int, list[_DayWindow]] = {}
    for weekday, windows in availability.items():
        if weekday not in range(len(WEEKDAYS)):
            raise ValueError(f"availability: unknown weekday number {weekday!r}")
        if any(end <= start for start, end in windows):
            raise ValueError(f"availability: a window of weekday {weekday} ends before it starts")
        if windows:
            result[weekday] = [
                (_since_midnight(s), _since_midnight(e)) for s, e in office_hours._merged(windows)
            ]
    return result


def _since_midnight(clock: dt.time) -> dt.timedelta:
    return dt.timedelta(
        hours=clock.hour,
        minutes=clock.minute,
        seconds=clock.second,
        microseconds=clock.microsecond,
    )


def _candidates(
    windows_by_weekday: Mapping[int, Sequence[_DayWindow]],
    first_day: dt.date,
    last_day: dt.date,
    earliest: dt.datetime,
    rules: SlotRules,
    holidays: office_hours.Holidays,
) -> Iterator[tuple[dt.datetime, tuple[dt.datetime, ...]]]:
    """Each grid wall time inside a window, in increasing order, as (bound, starts).

    ``starts`` are the instants the wall time names whose call fits inside its window;
    ``bound`` is an instant that no later wall time names anything before. The grid is
    counted in wall-clock time from local midnight.
    """
    if not windows_by_weekday:
        return
    zone, block, duration = rules.zone, rules.block, rules.duration
    day = first_day
    while day <= last_day:
        windows = windows_by_weekday.get(day.weekday())
        if windows and day not in holidays:
            midnight = dt.datetime.combine(day, dt.time.min)
            offset = _steady_offset(midnight, zone)
            for window_start, window_end in windows:
                # The first multiple of the block at or after the window's start.
                grid = -(-window_start // block) * block
                if offset is not None:
                    # Clocks do not change today: wall times and instants move in step.
                    day_start = (midnight - offset).replace(tzinfo=dt.UTC)
                    grid = max(grid, -(-(earliest - day_start) // block) * block)
                    while grid + duration <= window_end:
                        start = day_start + grid
                        yield start, (start,)
                        grid += block
                    continue
                opens, closes = midnight + window_start, midnight + window_end
                while grid < window_end:
                    wall = midnight + grid
                    grid += block
                    instants, bound = _instants(wall, zone)
                    yield (
                        bound,
                        tuple(s for s in instants if _fits(s, s + duration, opens, closes, zone)),
                    )
        day += ONE_DAY


def _steady_offset(midnight: dt.datetime, zone: dt.tzinfo) -> dt.timedelta | None:
    """The day's one UTC offset, or None when the clocks change during it (or at its ends).

    Clocks never change twice within one day, so equal offsets at both midnights (in both
    readings of each) mean no change in between.
    """
    next_midnight = midnight + ONE_DAY
    offsets = {
        _utcoffset(zone, moment)
        for moment in (
            midnight,
            midnight.replace(fold=1),
            next_midnight,
            next_midnight.replace(fold=1),
        )
    }
    return offsets.pop() if len(offsets) == 1 else None


def _instants(wall: dt.datetime, zone: dt.tzinfo) -> tuple[tuple[dt.datetime, ...], dt.datetime]:
    """The UTC instants a local wall time names, and a bound no later wall time goes below.

    None in a spring-forward gap (the wall time does not survive the round trip), two in an
    autumn fold. The bound is the earlier of the two readings (fold=0 and fold=1): clocks
    reach this wall time (or jump over it) no earlier than that.
    """
    before = _utcoffset(zone, wall)
    after = _utcoffset(zone, wall.replace(fold=1))
    if before == after:
        instant = (wall - before).replace(tzinfo=dt.UTC)
        return (instant,), instant
    readings = sorted((wall - offset).replace(tzinfo=dt.UTC) for offset in (before, after))
    real = tuple(
        reading for reading in readings if reading.astimezone(zone).replace(tzinfo=None) == wall
    )
    return real, readings[0]


def _fits(
    start: dt.datetime, end: dt.datetime, opens: dt.datetime, closes: dt.datetime, zone: dt.tzinfo
) -> bool:
    """Whether every instant of [start, end) shows a local wall time within [opens, closes]."""
    first = start.astimezone(zone)
    last = (end - INSTANT).astimezone(zone)
    if first.utcoffset() == last.utcoffset():
        # One offset throughout (clocks never change twice within a call): walls are linear.
        wall = first.replace(tzinfo=None)
        return opens <= wall and wall + (end - start) <= closes
    change = _offset_change(start, end - INSTANT, zone)
    return _fits(start, change, opens, closes, zone) and _fits(change, end, opens, closes, zone)


def _offset_change(low: dt.datetime, high: dt.datetime, zone: dt.tzinfo) -> dt.datetime:
    """The first instant after ``low`` whose UTC offset differs from low's (it is <= high).

    Only calls that straddle a clock change get here, so a bisection is cheap enough.
    """
    offset = low.astimezone(zone).utcoffset()
    while high - low > INSTANT:
        middle = low + (high - low) // 2
        if middle.astimezone(zone).utcoffset() == offset:
            low = middle
        else:
            high = middle
    return high


def _utcoffset(zone: dt.tzinfo, wall: dt.datetime) -> dt.timedelta:
    offset = zone.utcoffset(wall)
    if offset is None:
        raise ValueError(f"time zone {zone} has no UTC offset for {wall}")
    return offset
