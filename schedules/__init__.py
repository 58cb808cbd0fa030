"""Beat schedules: what runs when. Times of day are local (``COMMS_TIMEZONE``)."""

from __future__ import annotations

from typing import Any

# Seconds between outbox relays: events reach other services within this delay.
OUTBOX_RELAY_INTERVAL_SECONDS = 5.0

beat_schedule: dict[str, dict[str, Any]] = {
    "relay-outbox": {
        "task": "comms.relay_outbox",
        "schedule": OUTBOX_RELAY_INTERVAL_SECONDS,
        # A relay that could not run in time is superseded by the next one.
        "options": {"expires": OUTBOX_RELAY_INTERVAL_SECONDS * 2},
    },
}
