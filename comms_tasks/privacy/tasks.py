"""``comms.purge_expired``: redact email bodies and dead letters past the retention period
(nightly)."""

from __future__ import annotations

from typing import Any

from comms_tasks.app import app
from comms_tasks.models.base import utcnow
from comms_tasks.privacy import retention
from comms_tasks.settings import get_settings
from comms_tasks.task_names import PURGE_EXPIRED


@app.task(name=PURGE_EXPIRED)
def purge_expired() -> dict[str, Any]:
    settings = get_settings()
    return retention.purge_all_expired(utcnow(), settings.retention_days)
