"""``comms.send_email``: send due emails over one connection and record each result."""

from __future__ import annotations

import random
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from comms_tasks import sending
from comms_tasks.app import app
from comms_tasks.db import transaction
from comms_tasks.mail.sender import sender_from_settings
from comms_tasks.models.base import utcnow
from comms_tasks.settings import get_settings

SEND_EMAIL = "comms.send_email"
# Emails claimed at a time: one SMTP connection carries them all.
EMAILS_PER_CLAIM = 100
# Leave the rest to the next run well before the soft time limit interrupts us.
TIME_BUDGET_FRACTION = 0.8


@app.task(name=SEND_EMAIL)
def send_email(email_id: int | None = None) -> dict[str, Any]:
    """Send due emails (or just ``email_id``, now) until none is due or time is up."""
    settings = get_settings()
    rng = random.Random()  # noqa: S311 - retry jitter, not cryptography
    deadline = time.monotonic() + settings.task_soft_time_limit * TIME_BUDGET_FRACTION
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        with transaction() as session:
            messages = sending.prepare_batch(
                session, utcnow(), EMAILS_PER_CLAIM, settings, email_id
            )
        if not messages:
            break
        unrecorded = {message.email_id for message in messages}
        try:
            for result in sender_from_settings(settings).send(messages):
                with transaction() as session:
                    recorded = sending.record_result(session, result, utcnow(), rng)
                unrecorded.discard(result.email_id)
                if recorded is not None:
                    counts[recorded.status.value] = counts.get(recorded.status.value, 0) + 1
        except SoftTimeLimitExceeded:
            with transaction() as session:
                sending.release(session, sorted(unrecorded), utcnow())
            raise
        if email_id is not None:
            break
    return counts
