"""Slot finding, without a database: availability -> free call slots.

The properties compare ``free_slots`` with a brute-force reference that walks every UTC
block of the horizon and looks at local time only to read it (no local -> UTC conversion,
no fold or gap handling), and check each rule of SPEC §5 on every slot found.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import itertools
import random
import zoneinfo
from collections.abc import Mapping, Sequence
from typing import Any

import holidays as holiday_calendars
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comms_tasks.contracts.common import WEEKDAYS
from comms_tasks.rules import office_hours
from comms_tasks.rules.slots import BookedCalls, SlotRules, first_free_slot, free_slots

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
# Other zones, to exercise the rules where clocks change at other times and by other amounts:
# at 02:00 to the previous hour (New York), by 30 minutes (Lord Howe), at midnight (Havana,
# and Santiago, where Saturday 24:00 becomes Saturday 23:00), and a 45-minute offset
# without daylight saving (Kathmandu).
OTHER_ZONES = tuple(
    zoneinfo.ZoneInfo(name)
    for name in (
        "America/New_York",
        "Australia/Lord_Howe",
        "America/Havana",
        "America/Santiago",
        "Asia/Kathmandu",
    )
)
BLOCK = dt.timedelta(minutes=5)
DURATION = dt.timedelta(minutes=5)
LEAD_TIME = dt.timedelta(hours=2)
HORIZON = dt.timedelta(days=14)
MINUTE = dt.timedelta(minutes=1)
INSTANT = dt.timedelta(microseconds=1)
MINUTES_PER_DAY = 24 * 60
LAST_MINUTE_OF_DAY = MINUTES_PER_DAY - 1
STATES = (None, "BY", "BE")
FIRST_YEAR, LAST_YEAR = 2026, 2027
PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

SCENARIO_DURATIONS = (DURATION, DURATION, dt.timedelta(minutes=7), dt.timedelta(minutes=10))

THERAPIST = 1
OTHER_THERAPISTS = (2, 3)

Window = tuple[dt.time, dt.time]
Call = tuple[int, dt.datetime, dt.datetime]


def make_rules(
    *,
    zone: zoneinfo.ZoneInfo = BERLIN,
    calls_per_slot: int = 1,
    holiday_state: str | None = None,
    lead_time: dt.timedelta = LEAD_TIME,
    horizon: dt.timedelta = HORIZON,
    duration: dt.timedelta = DURATION,
) -> SlotRules:
    return SlotRules(
        zone=zone,
        lead_time=lead_time,
        horizon=horizon,
        block=BLOCK,
        duration=duration,
        calls_per_slot=calls_per_slot,
        holiday_state=holiday_state,
    )


@functools.cache
def holidays_of(state: str | None) -> office_hours.Holidays:
    return office_hours.Holidays(state)


def local(year: int, month: int, day: int, hour: int, minute: int, fold: int = 0) -> dt.datetime:
    """A Berlin wall time as a UTC instant."""
    wall = dt.datetime(year, month, day, hour, minute, tzinfo=BERLIN, fold=fold)
    return wall.astimezone(dt.UTC)


def availability(**days: Sequence[tuple[str, str]]) -> dict[int, list[Window]]:
    return office_hours.parse_availability(
        {
            day: [{"start": start, "end": end} for start, end in windows]
            for day, windows in days.items()
        }
    )


def slots(
    windows: Mapping[int, Sequence[Window]],
    now: dt.datetime,
    rules: SlotRules,
    booked: BookedCalls | None = None,
    *,
    therapist_id: int = THERAPIST,
    not_before: dt.datetime | None = None,
) -> list[dt.datetime]:
    return list(
        free_slots(
            therapist_id,
            windows,
            booked if booked is not None else BookedCalls(BLOCK),
            now,
            rules,
            holidays_of(rules.holiday_state),
            not_before=not_before,
        )
    )


def first(
    windows: Mapping[int, Sequence[Window]],
    now: dt.datetime,
    rules: SlotRules,
    booked: BookedCalls,
    *,
    therapist_id: int = THERAPIST,
    not_before: dt.datetime | None = None,
) -> dt.datetime | None:
    return first_free_slot(
        therapist_id,
        windows,
        booked,
        now,
        rules,
        holidays_of(rules.holiday_state),
        not_before=not_before,
    )


# --- The reference: every UTC block of the horizon, judged by its local reading ----------


@functools.cache
def holiday_dates(state: str | None) -> frozenset[dt.date]:
    calendar = holiday_calendars.country_holidays(
        "DE", subdiv=state, years=range(FIRST_YEAR - 1, LAST_YEAR + 2)
    )
    return frozenset(calendar.keys())


def block_counts(calls: Sequence[Call]) -> collections.Counter[int]:
    """Calls per 5-minute block, counted in whole seconds since the epoch."""
    block_seconds = int(BLOCK.total_seconds())
    counts: collections.Counter[int] = collections.Counter()
    for _, start, end in calls:
        start_second, end_second = int(start.timestamp()), int(end.timestamp())
        first_block = start_second // block_seconds
        last_block = (end_second + block_seconds - 1) // block_seconds - 1
        counts.update(range(first_block, last_block + 1))
    return counts


def call_load(counts: collections.Counter[int], start: dt.datetime, end: dt.datetime) -> int:
    return max(counts[block] for block in block_counts([(0, start, end)]))


def overlaps_a_call(
    therapist_id: int, calls: Sequence[Call], start: dt.datetime, end: dt.datetime
) -> bool:
    return any(who == therapist_id and s < end and start < e for who, s, e in calls)


def walls_during(start: dt.datetime, end: dt.datetime, zone: dt.tzinfo) -> list[dt.datetime]:
    """Local readings at the start, on every minute, and just before every minute of the call.

    Clocks change on whole minutes, so these include the extremes of each stretch of one offset.
    """
    minutes = int((end - start) / MINUTE)
    instants = [start + k * MINUTE for k in range(minutes)]
    instants += [start + k * MINUTE - INSTANT for k in range(1, minutes + 1)]
    return [moment.astimezone(zone).replace(tzinfo=None) for moment in instants]


def window_of(
    start: dt.datetime, windows: Mapping[int, Sequence[Window]], rules: SlotRules
) -> Window | None:
    """The window on the slot's local day that holds every local reading of the call."""
    wall = start.astimezone(rules.zone).replace(tzinfo=None)
    day = wall.date()
    for opens, closes in windows.get(day.weekday(), ()):
        low, high = dt.datetime.combine(day, opens), dt.datetime.combine(day, closes)
        if low <= wall <= high and all(
            low <= reading <= high
            for reading in walls_during(start, start + rules.duration, rules.zone)
        ):
            return opens, closes
    return None


def bounds(
    now: dt.datetime, rules: SlotRules, not_before: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    earliest = now + rules.lead_time
    if not_before is not None:
        earliest = max(earliest, not_before)
    return earliest, now + rules.horizon


def reference_slots(
    windows: Mapping[int, Sequence[Window]],
    calls: Sequence[Call],
    now: dt.datetime,
    rules: SlotRules,
    not_before: dt.datetime | None,
) -> list[dt.datetime]:
    # Every zone used here has offsets that are whole multiples of the block, so the local
    # grid (:00, :05, ...) is exactly the UTC grid.
    earliest, latest_end = bounds(now, rules, not_before)
    counts = block_counts(calls)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    start = epoch + -(-(earliest - epoch) // rules.block) * rules.block
    found = []
    while start + rules.duration <= latest_end:
        end = start + rules.duration
        if (
            start.astimezone(rules.zone).date() not in holiday_dates(rules.holiday_state)
            and window_of(start, windows, rules) is not None
            and not overlaps_a_call(THERAPIST, calls, start, end)
            and call_load(counts, start, end) < rules.calls_per_slot
        ):
            found.append(start)
        start += rules.block
    return found


def check_slots(
    found: Sequence[dt.datetime],
    windows: Mapping[int, Sequence[Window]],
    calls: Sequence[Call],
    now: dt.datetime,
    rules: SlotRules,
    not_before: dt.datetime | None = None,
    therapist_id: int = THERAPIST,
) -> None:
    """Every rule of a slot, checked on each one found."""
    earliest, latest_end = bounds(now, rules, not_before)
    counts = block_counts(calls)
    assert all(a < b for a, b in itertools.pairwise(found)), "not strictly increasing"
    for start in found:
        end = start + rules.duration
        reading = start.astimezone(rules.zone)
        assert start.tzinfo is dt.UTC
        # The local start exists: read back as a wall time (with its fold) it is the same instant.
        wall = reading.replace(tzinfo=None)
        assert wall.replace(tzinfo=rules.zone, fold=reading.fold).astimezone(dt.UTC) == start
        assert (wall.minute * MINUTE) % rules.block == dt.timedelta(0)
        assert (wall.second, wall.microsecond) == (0, 0)
        assert window_of(start, windows, rules) is not None, f"{reading} outside every window"
        assert start >= earliest, "inside the lead time or before not_before"
        assert start > now
        assert end <= latest_end, "beyond the horizon"
        assert reading.date() not in holiday_dates(rules.holiday_state), "on a holiday"
        assert not overlaps_a_call(therapist_id, calls, start, end), "overlaps their own call"
        assert call_load(counts, start, end) < rules.calls_per_slot, "over capacity"


# --- Strategies ------------------------------------------------------------------------


@functools.cache
def clock_changes(zone: zoneinfo.ZoneInfo) -> tuple[dt.datetime, ...]:
    """The hours in which the zone's offset changes, 2026-2027."""
    changes = []
    hour = dt.timedelta(hours=1)
    moment = dt.datetime(FIRST_YEAR, 1, 1, tzinfo=dt.UTC)
    while moment.year <= LAST_YEAR:
        if moment.astimezone(zone).utcoffset() != (moment + hour).astimezone(zone).utcoffset():
            changes.append(moment)
        moment += hour
    return tuple(changes)


def clock_time(minute_of_day: int) -> str:
    return f"{minute_of_day // 60:02d}:{minute_of_day % 60:02d}"


@st.composite
def availability_json(draw: st.DrawFn) -> dict[str, list[dict[str, str]]]:
    """Random windows on random weekdays, on the 5-minute grid or not, often near 02:00."""
    days = draw(st.sets(st.sampled_from(WEEKDAYS), max_size=len(WEEKDAYS)))
    result: dict[str, list[dict[str, str]]] = {}
    for day in sorted(days):
        windows = []
        for _ in range(draw(st.integers(1, 3))):
            start = draw(
                st.one_of(
                    st.integers(0, LAST_MINUTE_OF_DAY - 1),
                    st.integers(0, LAST_MINUTE_OF_DAY // 5 - 1).map(lambda m: m * 5),
                    st.integers(60, 240),  # around the clock changes
                )
            )
            length = draw(st.one_of(st.integers(1, 30), st.integers(1, 8 * 60)))
            end = min(start + length, LAST_MINUTE_OF_DAY)
            windows.append({"start": clock_time(start), "end": clock_time(end)})
        result[day] = windows
    return result


@st.composite
def moments(draw: st.DrawFn, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    """A 'now' in 2026-2027, often in the two weeks before a clock change."""
    changes = clock_changes(zone)
    seconds = draw(st.integers(0, 59))
    near_a_change = draw(st.booleans())
    if changes and near_a_change:
        change = draw(st.sampled_from(changes))
        before = draw(st.integers(-int(HORIZON / MINUTE), int(LEAD_TIME / MINUTE)))
        return change + before * MINUTE + dt.timedelta(seconds=seconds)
    moment = draw(
        st.datetimes(
            min_value=dt.datetime(FIRST_YEAR, 1, 1),
            max_value=dt.datetime(LAST_YEAR, 12, 31),
        )
    )
    return moment.replace(tzinfo=dt.UTC)


@st.composite
def booked_calls(draw: st.DrawFn, now: dt.datetime) -> list[Call]:
    """Calls of this and other therapists, at any second, some longer than a block."""
    calls = []
    for _ in range(draw(st.integers(0, 30))):
        who = draw(st.sampled_from((THERAPIST, *OTHER_THERAPISTS)))
        offset = draw(st.integers(-60 * 60, int(HORIZON.total_seconds())))
        # Most calls fall into the first days, where they compete with the first slots.
        offset //= draw(st.sampled_from((1, 10, 100)))
        start = now + dt.timedelta(seconds=offset)
        if draw(st.booleans()):
            start = start.replace(second=0, microsecond=0)
        length = dt.timedelta(minutes=draw(st.integers(1, 15)), seconds=draw(st.integers(0, 59)))
        calls.append((who, start, start + length))
    return calls


@st.composite
def calls_in_windows(
    draw: st.DrawFn,
    now: dt.datetime,
    zone: zoneinfo.ZoneInfo,
    windows: Mapping[int, Sequence[Window]],
) -> list[Call]:
    """Calls at any second in and around the windows of the next days: they meet the slots."""
    first_day = now.astimezone(zone).date()
    days = [
        day
        for day in (first_day + dt.timedelta(days=n) for n in range(HORIZON.days + 1))
        if day.weekday() in windows
    ]
    calls = []
    for _ in range(draw(st.integers(0, 10)) if days else 0):
        day = draw(st.sampled_from(days))
        opens, closes = draw(st.sampled_from(windows[day.weekday()]))
        span = dt.datetime.combine(day, closes) - dt.datetime.combine(day, opens)
        wall = dt.datetime.combine(day, opens) + dt.timedelta(
            seconds=draw(st.integers(-int(BLOCK.total_seconds()), int(span.total_seconds())))
        )
        start = wall.replace(tzinfo=zone).astimezone(dt.UTC)
        length = dt.timedelta(minutes=draw(st.integers(1, 12)), seconds=draw(st.integers(0, 59)))
        who = draw(st.sampled_from((THERAPIST, THERAPIST, *OTHER_THERAPISTS)))
        calls.append((who, start, start + length))
    return calls


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    zone = draw(st.one_of(st.just(BERLIN), st.sampled_from(OTHER_ZONES)))
    json = draw(availability_json())
    changes = clock_changes(zone)
    around_a_change = draw(st.booleans())
    if changes and around_a_change:
        # The clocks change within the horizon, inside a window of that day.
        change = draw(st.sampled_from(changes))
        now = change - draw(st.integers(0, int(HORIZON / MINUTE))) * MINUTE
        now += dt.timedelta(seconds=draw(st.integers(0, 59)))
        after_change = (change + dt.timedelta(hours=1)).astimezone(zone)
        minute = after_change.hour * 60 + after_change.minute
        # Either edge may fall just before, inside or just after the hour that is skipped
        # or repeated.
        opens = max(0, minute + draw(st.integers(-150, 45)))
        closes = min(LAST_MINUTE_OF_DAY, minute + draw(st.integers(-45, 150)))
        if closes <= opens:
            closes = min(LAST_MINUTE_OF_DAY, opens + draw(st.integers(1, 90)))
        day = WEEKDAYS[after_change.weekday()]
        json.setdefault(day, []).append({"start": clock_time(opens), "end": clock_time(closes)})
    else:
        now = draw(moments(zone))
    windows = office_hours.parse_availability(json)
    rules = make_rules(
        zone=zone,
        calls_per_slot=draw(st.integers(1, 3)),
        holiday_state=draw(st.sampled_from(STATES)),
        lead_time=draw(st.sampled_from((LEAD_TIME, dt.timedelta(0), dt.timedelta(minutes=37)))),
        # Calls longer than a block, or off its multiples, touch several blocks and may
        # straddle a clock change.
        duration=draw(st.sampled_from(SCENARIO_DURATIONS)),
    )
    not_before = draw(
        st.one_of(
            st.none(),
            st.none(),
            st.integers(0, int(HORIZON / MINUTE)).map(lambda minutes: now + minutes * MINUTE),
        )
    )
    calls = draw(booked_calls(now)) + draw(calls_in_windows(now, zone, windows))
    return {
        "windows": windows,
        "calls": calls,
        "now": now,
        "rules": rules,
        "not_before": not_before,
    }


def index_of(calls: Sequence[Call]) -> BookedCalls:
    booked = BookedCalls(BLOCK)
    for who, start, end in calls:
        booked.add(who, start, end)
    return booked


# --- Properties --------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(scenarios())
def test_every_slot_keeps_every_rule_and_none_is_missed(scenario: dict[str, Any]) -> None:
    windows, calls = scenario["windows"], scenario["calls"]
    now, rules, not_before = scenario["now"], scenario["rules"], scenario["not_before"]

    found = slots(windows, now, rules, index_of(calls), not_before=not_before)

    check_slots(found, windows, calls, now, rules, not_before)
    assert found == reference_slots(windows, calls, now, rules, not_before)
    first_found = first(windows, now, rules, index_of(calls), not_before=not_before)
    assert first_found == (found[0] if found else None)


@st.composite
def competing_therapists(draw: st.DrawFn) -> dict[int, dict[int, list[Window]]]:
    """Therapists whose short windows start at nearly the same time: they compete for blocks."""
    result = {}
    for therapist_id in range(1, draw(st.integers(2, 6)) + 1):
        json: dict[str, list[dict[str, str]]] = {}
        for day in draw(st.sets(st.sampled_from(WEEKDAYS), min_size=1, max_size=3)):
            start = 9 * 60 + draw(st.integers(0, 12))
            end = start + draw(st.integers(5, 40))
            json[day] = [{"start": clock_time(start), "end": clock_time(end)}]
        result[therapist_id] = office_hours.parse_availability(json)
    return result


@PROPERTY_SETTINGS
@given(
    therapists=competing_therapists(),
    now=moments(BERLIN),
    calls_per_slot=st.integers(1, 3),
    rounds=st.integers(1, 4),
    order_seed=st.integers(0, 2**32 - 1),
)
def test_greedy_booking_never_exceeds_capacity_nor_double_books(
    therapists: dict[int, dict[int, list[Window]]],
    now: dt.datetime,
    calls_per_slot: int,
    rounds: int,
    order_seed: int,
) -> None:
    rules = make_rules(calls_per_slot=calls_per_slot)
    booked = BookedCalls(BLOCK)
    calls: list[Call] = []
    order = list(therapists)
    shuffle = random.Random(order_seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for therapist_id in order:
            start = first(therapists[therapist_id], now, rules, booked, therapist_id=therapist_id)
            if start is None:
                continue
            check_slots([start], therapists[therapist_id], calls, now, rules, None, therapist_id)
            booked.add(therapist_id, start, start + rules.duration)
            calls.append((therapist_id, start, start + rules.duration))

    assert len(booked) == len(calls)
    assert max(block_counts(calls).values(), default=0) <= calls_per_slot
    for therapist_id in therapists:
        own = sorted((s, e) for who, s, e in calls if who == therapist_id)
        assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(own))


# --- Daylight saving -----------------------------------------------------------------------


def test_spring_forward_the_missing_hour_has_no_slot() -> None:
    # Sunday 2026-03-29: at 02:00 the clocks jump to 03:00 (01:00 UTC).
    now = local(2026, 3, 28, 12, 0)
    found = slots(availability(sunday=[("01:30", "03:30")]), now, make_rules())

    on_the_day = [s for s in found if s.astimezone(BERLIN).date() == dt.date(2026, 3, 29)]
    readings = [s.astimezone(BERLIN).time() for s in on_the_day]
    assert not [r for r in readings if dt.time(2, 0) <= r < dt.time(3, 0)]
    assert dt.datetime(2026, 3, 29, 1, 0, tzinfo=dt.UTC) in on_the_day  # 03:00 local
    assert local(2026, 3, 29, 3, 0) == dt.datetime(2026, 3, 29, 1, 0, tzinfo=dt.UTC)
    # 01:30-01:55 (+01:00) and 03:00-03:25 (+02:00): the window is one real hour long.
    assert len(on_the_day) == 12
    assert on_the_day[0] == dt.datetime(2026, 3, 29, 0, 30, tzinfo=dt.UTC)
    assert on_the_day[-1] == dt.datetime(2026, 3, 29, 1, 25, tzinfo=dt.UTC)


def test_fall_back_the_repeated_hour_gives_slots_in_both_passes() -> None:
    # Sunday 2026-10-25: at 03:00 the clocks go back to 02:00 (01:00 UTC).
    now = local(2026, 10, 24, 12, 0)
    found = slots(availability(sunday=[("02:00", "03:00")]), now, make_rules())

    on_the_day = [s for s in found if s.date() == dt.date(2026, 10, 25)]
    first_pass = [s for s in on_the_day if s.hour == 0]
    second_pass = [s for s in on_the_day if s.hour == 1]
    assert len(first_pass) == len(second_pass) == 12
    assert len(on_the_day) == 24
    assert on_the_day == sorted(on_the_day)
    assert {s.astimezone(BERLIN).fold for s in first_pass} == {0}
    assert {s.astimezone(BERLIN).fold for s in second_pass} == {1}
    # The last call of the first pass ends exactly when the clocks go back.
    assert first_pass[-1] == dt.datetime(2026, 10, 25, 0, 55, tzinfo=dt.UTC)


def test_a_horizon_ending_in_the_repeated_hour_cuts_the_second_pass() -> None:
    # The horizon ends at 2026-10-25 01:32 UTC, 02:32 local in the second pass.
    now = dt.datetime(2026, 10, 11, 1, 32, tzinfo=dt.UTC)
    found = slots(availability(sunday=[("02:00", "03:00")]), now, make_rules())

    on_the_day = [s for s in found if s.date() == dt.date(2026, 10, 25)]
    assert len(on_the_day) == 12 + 6
    assert on_the_day[-1] == dt.datetime(2026, 10, 25, 1, 25, tzinfo=dt.UTC)


def test_a_call_may_straddle_a_clock_change_when_every_minute_of_it_is_in_the_window() -> None:
    seven_minutes = make_rules(duration=dt.timedelta(minutes=7))
    # Spring: 01:55 local + 7 minutes of real time ends at 03:02 local.
    spring = slots(
        availability(sunday=[("01:30", "03:30")]), local(2026, 3, 28, 12, 0), seven_minutes
    )
    assert local(2026, 3, 29, 1, 55) in spring
    spring = slots(
        availability(sunday=[("01:30", "03:01")]), local(2026, 3, 28, 12, 0), seven_minutes
    )
    assert local(2026, 3, 29, 1, 50) in spring
    assert local(2026, 3, 29, 1, 55) not in spring

    # Autumn: 02:55 (first pass) + 7 minutes ends at 02:02 of the second pass.
    first_pass_0255 = local(2026, 10, 25, 2, 55, fold=0)
    autumn = slots(
        availability(sunday=[("02:00", "03:00")]), local(2026, 10, 24, 12, 0), seven_minutes
    )
    assert first_pass_0255 in autumn
    # From 02:30 on, the two minutes after the clocks went back (02:00-02:02) are outside.
    autumn = slots(
        availability(sunday=[("02:30", "03:00")]), local(2026, 10, 24, 12, 0), seven_minutes
    )
    assert first_pass_0255 not in autumn
    assert local(2026, 10, 25, 2, 50, fold=0) in autumn


# --- Holidays ------------------------------------------------------------------------------


def test_a_national_holiday_has_no_slot() -> None:
    now = local(2026, 12, 14, 8, 0)  # a Monday
    found = slots(availability(friday=[("09:00", "10:00")]), now, make_rules())

    days = {s.astimezone(BERLIN).date() for s in found}
    assert days == {dt.date(2026, 12, 18)}  # Friday 2026-12-25 is Christmas Day


@pytest.mark.parametrize(
    ("state", "epiphany_has_a_slot"), [(None, True), ("BY", False), ("BE", True)]
)
def test_a_state_holiday_has_no_slot_in_that_state_only(
    state: str | None, epiphany_has_a_slot: bool
) -> None:
    now = local(2026, 1, 2, 8, 0)
    found = slots(availability(tuesday=[("09:00", "09:05")]), now, make_rules(holiday_state=state))

    days = {s.astimezone(BERLIN).date() for s in found}
    epiphany = dt.date(2026, 1, 6)  # Heilige Drei Könige: a holiday in Bavaria, not in Berlin
    assert (epiphany in days) is epiphany_has_a_slot
    assert dt.date(2026, 1, 13) in days


def test_holidays_answers_dates_and_datetimes_and_rejects_unknown_states() -> None:
    bavaria = office_hours.Holidays("BY")
    assert dt.date(2026, 1, 6) in bavaria
    assert dt.datetime(2026, 1, 6, 12, 0) in bavaria
    assert dt.date(2026, 1, 7) not in bavaria
    assert dt.date(2027, 12, 25) in bavaria
    assert dt.date(2026, 1, 6) not in office_hours.Holidays()
    assert dt.date(2026, 10, 3) in office_hours.Holidays()
    assert "2026-10-03" not in office_hours.Holidays()
    with pytest.raises(NotImplementedError):
        office_hours.Holidays("XX")


# --- Windows, lead time, horizon -----------------------------------------------------------

MONDAY = dt.date(2026, 6, 1)  # a Monday without holidays around it (+02:00)


def test_a_window_shorter_than_a_call_has_no_slot() -> None:
    now = local(2026, 6, 1, 0, 0)
    assert (
        slots(availability(**{day: [("09:00", "09:03")] for day in WEEKDAYS}), now, make_rules())
        == []
    )


def test_a_window_of_exactly_one_call_has_one_slot_a_day() -> None:
    now = local(2026, 6, 1, 0, 0)
    found = slots(availability(wednesday=[("09:00", "09:05")]), now, make_rules())

    assert found == [local(2026, 6, 3, 9, 0), local(2026, 6, 10, 9, 0)]


def test_now_inside_a_window_gives_the_first_grid_time_after_the_lead_time() -> None:
    now = local(2026, 6, 1, 9, 17) + dt.timedelta(seconds=23)
    found = first(availability(monday=[("08:00", "18:00")]), now, make_rules(), BookedCalls(BLOCK))

    assert found == local(2026, 6, 1, 11, 20)


def test_a_window_starting_off_the_grid_starts_at_the_next_grid_time() -> None:
    now = local(2026, 6, 1, 0, 0)
    found = slots(availability(monday=[("09:03", "09:20")]), now, make_rules())

    assert found[:3] == [
        local(2026, 6, 1, 9, 5),
        local(2026, 6, 1, 9, 10),
        local(2026, 6, 1, 9, 15),
    ]
    assert len(found) == 3 * 2  # two Mondays in the horizon


def test_the_call_must_end_within_the_horizon() -> None:
    now = local(2026, 6, 1, 12, 0)  # the horizon ends Monday 2026-06-15 12:00 local
    found = slots(availability(monday=[("11:50", "12:10")]), now, make_rules())

    assert found == [
        local(2026, 6, 8, 11, 50),
        local(2026, 6, 8, 11, 55),
        local(2026, 6, 8, 12, 0),
        local(2026, 6, 8, 12, 5),
        local(2026, 6, 15, 11, 50),
        local(2026, 6, 15, 11, 55),
    ]


def test_not_before_moves_the_search_to_the_next_day() -> None:
    now = local(2026, 6, 1, 6, 0)
    windows = availability(monday=[("09:00", "10:00")], tuesday=[("14:00", "15:00")])
    booked = BookedCalls(BLOCK)

    assert first(windows, now, make_rules(), booked) == local(2026, 6, 1, 9, 0)
    next_day = dt.datetime.combine(dt.date(2026, 6, 2), dt.time.min, BERLIN)
    assert first(windows, now, make_rules(), booked, not_before=next_day) == local(
        2026, 6, 2, 14, 0
    )
    # The lead time still holds when not_before is earlier.
    assert first(windows, now, make_rules(), booked, not_before=now) == local(2026, 6, 1, 9, 0)
    late = local(2026, 6, 2, 14, 12)
    assert first(windows, now, make_rules(), booked, not_before=late) == local(2026, 6, 2, 14, 15)


def test_no_availability_means_no_slot() -> None:
    now = local(2026, 6, 1, 6, 0)
    assert first({}, now, make_rules(), BookedCalls(BLOCK)) is None
    assert first(availability(monday=[]), now, make_rules(), BookedCalls(BLOCK)) is None


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="now"):
        slots(
            availability(monday=[("09:00", "10:00")]), dt.datetime(2026, 6, 1, 6, 0), make_rules()
        )


# --- Booked calls and operator capacity ------------------------------------------------------


def test_an_unaligned_call_blocks_the_slots_it_overlaps() -> None:
    now = local(2026, 6, 1, 6, 0)
    windows = availability(monday=[("09:00", "09:20")])
    booked = BookedCalls(BLOCK)
    booked.add(THERAPIST, local(2026, 6, 1, 9, 2), local(2026, 6, 1, 9, 7))

    # Capacity 2: only the overlap with their own call rules 09:00 and 09:05 out.
    found = slots(windows, now, make_rules(calls_per_slot=2), booked)
    assert [s for s in found if s.date() == MONDAY] == [
        local(2026, 6, 1, 9, 10),
        local(2026, 6, 1, 9, 15),
    ]
    # Another therapist may take them while there is room...
    other = slots(windows, now, make_rules(calls_per_slot=2), booked, therapist_id=2)
    assert other[0] == local(2026, 6, 1, 9, 0)
    # ...but with capacity 1 the call fills both blocks it touches, for everyone.
    other = slots(windows, now, make_rules(calls_per_slot=1), booked, therapist_id=2)
    assert other[0] == local(2026, 6, 1, 9, 10)


def test_calls_that_touch_do_not_overlap() -> None:
    now = local(2026, 6, 1, 6, 0)
    booked = BookedCalls(BLOCK)
    booked.add(THERAPIST, local(2026, 6, 1, 9, 5), local(2026, 6, 1, 9, 10))

    found = slots(availability(monday=[("09:00", "09:15")]), now, make_rules(), booked)
    assert [s for s in found if s.date() == MONDAY] == [
        local(2026, 6, 1, 9, 0),
        local(2026, 6, 1, 9, 10),
    ]


@pytest.mark.parametrize("calls_per_slot", [1, 2])
def test_capacity_is_shared_across_therapists(calls_per_slot: int) -> None:
    now = local(2026, 6, 1, 6, 0)
    windows = availability(monday=[("09:00", "10:00")])
    rules = make_rules(calls_per_slot=calls_per_slot)
    booked = BookedCalls(BLOCK)
    taken = []
    for therapist_id in (1, 2, 3):
        start = first(windows, now, rules, booked, therapist_id=therapist_id)
        assert start is not None
        booked.add(therapist_id, start, start + DURATION)
        taken.append(start.astimezone(BERLIN).strftime("%H:%M"))

    assert taken == {1: ["09:00", "09:05", "09:10"], 2: ["09:00", "09:00", "09:05"]}[calls_per_slot]


def test_a_full_horizon_gives_no_slot() -> None:
    now = local(2026, 6, 1, 6, 0)
    windows = availability(monday=[("09:00", "09:10")])
    booked = BookedCalls(BLOCK)
    while (start := first(windows, now, make_rules(), booked)) is not None:
        booked.add(THERAPIST, start, start + DURATION)

    assert len(booked) == 2 * 2  # two Mondays, two slots each


def test_the_index_answers_many_queries_over_many_calls() -> None:
    rng = random.Random(20260601)
    therapists = 1000
    origin = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    span_seconds = int(HORIZON.total_seconds())
    calls: list[Call] = []
    for _ in range(20_000):
        start = origin + dt.timedelta(seconds=rng.randrange(span_seconds))
        calls.append(
            (
                rng.randrange(therapists),
                start,
                start + dt.timedelta(seconds=rng.randrange(60, 1200)),
            )
        )
    booked = index_of(calls)
    assert len(booked) == len(calls)

    by_therapist: dict[int, list[Call]] = collections.defaultdict(list)
    for call in calls:
        by_therapist[call[0]].append(call)
    counts = block_counts(calls)
    answers: collections.Counter[tuple[bool, int]] = collections.Counter()
    for _ in range(10_000):
        therapist_id = rng.randrange(therapists)
        # A quarter of the queries fall after the last call.
        start = origin + dt.timedelta(seconds=rng.randrange(span_seconds * 4 // 3))
        end = start + dt.timedelta(seconds=rng.randrange(1, 900))
        free = booked.therapist_is_free(therapist_id, start, end)
        assert free is not overlaps_a_call(therapist_id, by_therapist[therapist_id], start, end)
        load = booked.load(start, end)
        assert load == call_load(counts, start, end)
        answers[free, load] += 1
    # Each question got a range of answers.
    assert {free for free, _ in answers} == {True, False}
    assert {0, 1, 2, 10} <= {load for _, load in answers}


def test_the_index_refuses_calls_that_end_before_they_start_or_are_naive() -> None:
    booked = BookedCalls(BLOCK)
    start = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.UTC)
    with pytest.raises(ValueError):
        booked.add(THERAPIST, start, start)
    with pytest.raises(ValueError):
        booked.add(THERAPIST, start.replace(tzinfo=None), start.replace(tzinfo=None) + DURATION)
    assert len(booked) == 0
    assert booked.load(start, start + DURATION) == 0
    assert booked.therapist_is_free(THERAPIST, start, start + DURATION)


# --- Parsing availability ----------------------------------------------------------------


def test_parse_availability() -> None:
    assert office_hours.parse_availability(None) == {}
    assert office_hours.parse_availability({}) == {}
    assert office_hours.parse_availability(
        {
            "monday": [{"start": "14:00", "end": "16:30"}, {"start": "09:00", "end": "12:00"}],
            "sunday": [{"start": "08:00", "end": "09:00"}, {"start": "08:30", "end": "10:00"}],
            "friday": [],
        }
    ) == {
        0: [(dt.time(9, 0), dt.time(12, 0)), (dt.time(14, 0), dt.time(16, 30))],
        6: [(dt.time(8, 0), dt.time(10, 0))],
    }


@pytest.mark.parametrize(
    "data",
    [
        {"Monday": [{"start": "09:00", "end": "10:00"}]},
        {"monday": [{"start": "10:00", "end": "09:00"}]},
        {"monday": [{"start": "24:00", "end": "25:00"}]},
        {"monday": [{"start": "09:00"}]},
    ],
)
def test_parse_availability_refuses_what_validation_should_have_stopped(
    data: dict[str, Any],
) -> None:
    with pytest.raises(ValueError, match="availability"):
        office_hours.parse_availability(data)


def test_a_search_from_a_later_day_lasts_a_horizon_from_that_day() -> None:
    rules = make_rules()
    now = local(2026, 12, 1, 9, 0)
    later = local(2026, 12, 21, 0, 0)  # 20 days ahead, beyond the horizon from now
    mondays = availability(monday=[("09:00", "09:10")])
    found = list(
        free_slots(
            THERAPIST,
            mondays,
            BookedCalls(BLOCK),
            now,
            rules,
            holidays_of(None),
            not_before=later,
            horizon_from=later,
        )
    )
    assert found == [
        local(2026, 12, 21, 9, 0),
        local(2026, 12, 21, 9, 5),
        local(2026, 12, 28, 9, 0),
        local(2026, 12, 28, 9, 5),
    ]
    assert slots(mondays, now, rules, not_before=later) == []
    # A start in the past never shortens the horizon from now, nor moves the lead time.
    earlier = now - dt.timedelta(days=3)
    assert list(
        free_slots(
            THERAPIST,
            mondays,
            BookedCalls(BLOCK),
            now,
            rules,
            holidays_of(None),
            horizon_from=earlier,
        )
    ) == slots(mondays, now, rules)
