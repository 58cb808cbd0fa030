"""``comms.batch_requests``: this week's email for every contactable therapist."""

from __future__ import annotations

from typing import Any

from comms_tasks import emails
from comms_tasks.app import app
from comms_tasks.db import transaction
from comms_tasks.models.base import utcnow
from comms_tasks.settings import get_settings
from comms_tasks.tasks.sending import send_email

BATCH_REQUESTS = "comms.batch_requests"
# Therapists per transaction: bounded locks and memory, progress survives a crash.
THERAPISTS_PER_CHUNK = 500


@app.task(name=BATCH_REQUESTS)
def batch_requests(helper: bool = False) -> dict[str, Any]:
    """Queue the emails, then hand them to ``comms.send_email``.

    A run with more than one chunk starts a helper that works through the same
    therapists from the other end, so two processes render at once. They cannot do a
    therapist twice: a chunk locks its therapists (``SKIP LOCKED``: the other run leaves
    them), and a request already in an email is no longer asked about.
    """
    settings = get_settings()
    now = utcnow()
    with transaction() as session:
        candidates = emails.batch_candidates(session)
    chunks = [
        candidates[start : start + THERAPISTS_PER_CHUNK]
        for start in range(0, len(candidates), THERAPISTS_PER_CHUNK)
    ]
    if helper:
        chunks.reverse()
    elif len(chunks) > 1:
        batch_requests.apply_async(kwargs={"helper": True})
    total = emails.BatchReport()
    for chunk in chunks:
        with transaction() as session:
            report = emails.batch_chunk(session, chunk, now, settings)
        total.emails_queued += report.emails_queued
        total.requests_asked += report.requests_asked
        total.therapists_skipped += report.therapists_skipped
    if total.emails_queued:
        send_email.delay()
    return {
        "candidates": len(candidates),
        "emails_queued": total.emails_queued,
        "requests_asked": total.requests_asked,
        "therapists_skipped": total.therapists_skipped,
    }
