"""``comms.purge_expired``: redact email bodies past the retention period (nightly)."""

from __future__ import annotations

from typing import Any

from comms_tasks import retention
from comms_tasks.app import app
from comms_tasks.db import transaction
from comms_tasks.models.base import utcnow
from comms_tasks.settings import get_settings

PURGE_EXPIRED = "comms.purge_expired"
# Emails per transaction: short locks, and progress survives an interruption.
EMAILS_PER_CHUNK = 1000


@app.task(name=PURGE_EXPIRED)
def purge_expired() -> dict[str, Any]:
    settings = get_settings()
    now = utcnow()
    redacted = 0
    while True:
        with transaction() as session:
            count = retention.purge_expired(session, now, settings.retention_days, EMAILS_PER_CHUNK)
        redacted += count
        if count < EMAILS_PER_CHUNK:
            return {"redacted": redacted}
