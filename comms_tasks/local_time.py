"""Times as operators read them: local time (``COMMS_TIMEZONE``) with its zone.

Stored times are UTC; everything ``comms`` prints goes through here, so a table says
``2026-07-01 12:00 CEST`` and ``--json`` says ``2026-07-01T12:00:00+02:00``, never a
bare UTC time without a marker.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo


def _zone(zone: zoneinfo.ZoneInfo | None) -> zoneinfo.ZoneInfo:
    if zone is not None:
        return zone
    from comms_tasks.settings import get_settings

    return get_settings().zone


def local_iso(value: dt.datetime | None, zone: zoneinfo.ZoneInfo | None = None) -> str | None:
    """ISO 8601 in local time with its offset, for ``--json``; None stays None."""
    return None if value is None else value.astimezone(_zone(zone)).isoformat()


def local_text(
    value: dt.datetime | str | None,
    zone: zoneinfo.ZoneInfo | None = None,
    *,
    seconds: bool = False,
    missing: str = "-",
) -> str:
    """``2026-07-01 12:00 CEST`` (with ``seconds``, ``12:00:00``); ``missing`` for None.

    Takes a datetime or the ISO string of one (as the JSON-ready dicts hold them).
    """
    if value is None:
        return missing
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    local = value.astimezone(_zone(zone))
    return local.strftime(f"%Y-%m-%d %H:%M{':%S' if seconds else ''} %Z")


def local_clock(
    value: dt.datetime | str, zone: zoneinfo.ZoneInfo | None = None, *, seconds: bool = False
) -> str:
    """The local time of day with its zone: ``12:00 CEST`` (``12:00:05 CEST``)."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.astimezone(_zone(zone)).strftime(f"%H:%M{':%S' if seconds else ''} %Z")
