"""``comms.batch_requests``: this week's email for every contactable therapist."""

from __future__ import annotations

import logging
from typing import Any

from comms_tasks.app import app
from comms_tasks.db import transaction
from comms_tasks.models.base import utcnow
from comms_tasks.settings import get_settings
from comms_tasks.emails.tasks import send_email
from comms_tasks.emails import email_rules

log = logging.getLogger(__name__)

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
        candidates = email_rules.batch_candidates(session)
    chunks = [
        candidates[start : start + THERAPISTS_PER_CHUNK]
        for start in range(0, len(candidates), THERAPISTS_PER_CHUNK)
    ]
    if helper:
        chunks.reverse()
    elif len(chunks) > 1:
        batch_requests.apply_async(kwargs={"helper": True})
    total = email_rules.BatchReport()
    chunks_failed = 0
    for chunk in chunks:
        try:
            with transaction() as session:
                report = email_rules.batch_chunk(session, chunk, now, settings)
        except Exception as exc:  # noqa: BLE001 - the other chunks still run
            # A therapist's own problem is isolated inside the chunk; this is the chunk's
            # (e.g. the database went away). Its therapists are asked by the next run.
            chunks_failed += 1
            log.error(
                "batch: the chunk of therapists %s to %s failed: %s",
                chunk[0],
                chunk[-1],
                email_rules.describe_error(exc),
            )
            continue
        total.emails_queued += report.emails_queued
        total.requests_asked += report.requests_asked
        total.therapists_skipped += report.therapists_skipped
        total.failed_therapist_ids += report.failed_therapist_ids
    if total.emails_queued:
        send_email.delay()
    return {
        "candidates": len(candidates),
        "emails_queued": total.emails_queued,
        "requests_asked": total.requests_asked,
        "therapists_skipped": total.therapists_skipped,
        # Each failed therapist is logged by id; the count is enough here.
        "therapists_failed": len(total.failed_therapist_ids),
        "chunks_failed": chunks_failed,
    }
