"""The demo's past: a few emails sent nine days ago that nobody answered.

Other services' data reaches the service only as messages (``comms demo``), but emails
are the service's own history. So that the first ``make run`` also shows follow-up
calls, the demo records a handful of emails as sent before today, asking about requests
of the demo messages. Not used outside the demo.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from comms_tasks.emails import composing
from comms_tasks.mail import tokens as reply_tokens
from comms_tasks.mail.message import new_message_id
from comms_tasks.mail.render import PatientEntry, Recipient
from comms_tasks.models import Email, EmailBatch, EmailStatus, EmailTemplate
from comms_tasks.models.read_models import full_name
from comms_tasks.ops.demo import DemoMessage
from comms_tasks.settings import Settings

HISTORY_THERAPISTS = 5
HISTORY_REQUESTS_PER_EMAIL = 2
HISTORY_SENT_AGO = dt.timedelta(days=9)
# The past emails' dedup keys start with this (a therapist's id follows).
DEDUP_PREFIX = "demo-history:"


@dataclasses.dataclass(frozen=True)
class PastEmail:
    therapist: dict[str, Any]
    requests: tuple[dict[str, Any], ...]


def past_emails(messages: Sequence[DemoMessage]) -> list[PastEmail]:
    """Callable therapists with several requests, and their two oldest requests."""
    payloads = [message.kwargs["event"] for message in messages]
    requests_by_therapist: dict[int, list[dict[str, Any]]] = {}
    for event in payloads:
        if event["event_type"] == "placement_request.created":
            payload = event["payload"]
            requests_by_therapist.setdefault(payload["therapist_id"], []).append(payload)
    chosen = []
    for event in payloads:
        therapist = event["payload"]
        if event["event_type"] != "therapist.upserted" or therapist["status"] != "active":
            continue
        requests = sorted(
            requests_by_therapist.get(therapist["therapist_id"], []),
            key=lambda payload: payload["created_at"],
        )
        callable_ = therapist["email"] and therapist["phone"] and therapist["phone_availability"]
        if callable_ and len(requests) > HISTORY_REQUESTS_PER_EMAIL:
            chosen.append(PastEmail(therapist, tuple(requests[:HISTORY_REQUESTS_PER_EMAIL])))
        if len(chosen) == HISTORY_THERAPISTS:
            break
    return chosen


def _entry(position: int, request: dict[str, Any]) -> PatientEntry:
    patient = request["patient"]
    registered = patient.get("registered_on")
    summary = {
        **patient,
        "registered_on": dt.date.fromisoformat(registered) if registered else None,
    }
    return composing.patient_entry(request["placement_request_id"], position, summary)


def record_past_emails(
    session: Session, history: Sequence[PastEmail], now: dt.datetime, settings: Settings
) -> int:
    """Store the past emails as sent; returns how many were new (it is idempotent)."""
    renderer = composing.renderer_for(settings.sender_name)
    sent_at = now - HISTORY_SENT_AGO
    added = 0
    for past in history:
        therapist = past.therapist
        dedup_key = f"{DEDUP_PREFIX}{therapist['therapist_id']}"
        if session.scalar(select(Email.id).where(Email.dedup_key == dedup_key)) is not None:
            continue
        entries = [_entry(n, request) for n, request in enumerate(past.requests, start=1)]
        template = (
            EmailTemplate.INITIAL_CONTACT if len(entries) == 1 else EmailTemplate.BATCH_REQUEST
        )
        recipient = Recipient(
            therapist["salutation"],
            therapist["title"],
            therapist["first_name"],
            therapist["last_name"],
        )
        rendered = renderer.render(template.value, recipient, entries)
        session.add(
            Email(
                therapist_id=therapist["therapist_id"],
                template=template,
                dedup_key=dedup_key,
                recipient_email=therapist["email"],
                recipient_name=full_name(
                    therapist["title"], therapist["first_name"], therapist["last_name"]
                ),
                sender_email=settings.sender_email,
                sender_name=settings.sender_name,
                reply_token=(token := reply_tokens.new_token()),
                reply_to=composing.reply_address(settings, token),
                subject=rendered.subject,
                body_html=rendered.body_html,
                body_text=rendered.body_text,
                message_id=new_message_id(settings.sender_email),
                status=EmailStatus.SENT,
                queued_at=sent_at,
                sent_at=sent_at,
                created_at=sent_at,
                batches=[
                    EmailBatch(placement_request_id=entry.placement_request_id, priority=n)
                    for n, entry in enumerate(entries, start=1)
                ],
            )
        )
        added += 1
    return added
