"""``comms.relay_outbox``: publish pending events to the exchange ``comms.events``."""

from __future__ import annotations

from typing import Any

from comms_tasks.app import app
from comms_tasks.db import transaction
from comms_tasks.events import outbox
from comms_tasks.settings import get_settings
from comms_tasks.task_names import RELAY_OUTBOX


@app.task(name=RELAY_OUTBOX)
def relay_outbox() -> dict[str, Any]:
    """Relay one batch of pending events; beat runs this every few seconds."""
    settings = get_settings()
    url = settings.effective_events_broker_url
    # The embedded broker needs its folders; another broker gets its own defaults.
    same_broker = url == settings.effective_broker_url
    options = dict(app.conf.broker_transport_options or {}) if same_broker else {}
    with transaction() as session:
        report = outbox.relay(
            session, url, limit=settings.outbox_batch_size, transport_options=options
        )
    return {"published": report.published, "pending": report.pending, "error": report.error}
