"""The day's scheduled calls as an iCalendar file: ids, times and phone numbers, no health
data (``comms calls ics``)."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Sequence
from typing import Any

import icalendar


def call_sheet_calendar(
    day: dt.date, sheet: Sequence[dict[str, Any]], zone: zoneinfo.ZoneInfo
) -> tuple[bytes, int]:
    """The calendar of ``sheet``'s scheduled calls, and how many it holds."""
    calendar = icalendar.Calendar()
    calendar.add("prodid", "-//Therapievermittlung//comms call sheet//DE")
    calendar.add("version", "2.0")
    calendar.add("x-wr-calname", f"Rückrufe {day:%d.%m.%Y}")
    stamp = dt.datetime.now(dt.UTC)
    scheduled = [call for call in sheet if call["status"] == "scheduled"]
    for call in scheduled:
        start = dt.datetime.fromisoformat(call["scheduled_at"]).astimezone(zone)
        event = icalendar.Event()
        event.add("uid", f"comms-call-{call['call_id']}@therapievermittlung")
        event.add("dtstamp", stamp)
        event.add("dtstart", start)
        event.add("dtend", start + dt.timedelta(minutes=call["duration_minutes"]))
        event.add("summary", f"Rückruf {call['therapist'] or call['therapist_id']}")
        requests = ", ".join(f"Nr. {p['placement_request_id']}" for p in call["patients"])
        event.add(
            "description",
            f"Telefon: {call['phone'] or '-'}\nAnfragen: {requests}\n"
            f"Details: comms calls today --date {day.isoformat()}",
        )
        if call["phone"]:
            event.add("location", call["phone"])
        calendar.add_component(event)
    calendar.add_missing_timezones()
    return calendar.to_ical(), len(scheduled)
