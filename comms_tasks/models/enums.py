"""The status vocabularies, stored by their lower-case values."""

from __future__ import annotations

import enum


class TherapistStatus(enum.StrEnum):
    ACTIVE = "active"
    BLOCKED = "blocked"
    INACTIVE = "inactive"


class PlacementRequestStatus(enum.StrEnum):
    OPEN = "open"
    IN_PROGRESS = "in_progress"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def is_pending(self) -> bool:
        """Still waiting for a therapist's answer: may be asked about."""
        return self in PENDING_REQUEST_STATUSES


# Requests still waiting for an answer: they may be asked about, or kept in an email.
PENDING_REQUEST_STATUSES = (PlacementRequestStatus.OPEN, PlacementRequestStatus.IN_PROGRESS)


class EmailStatus(enum.StrEnum):
    DRAFT = "draft"
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"


class EmailTemplate(enum.StrEnum):
    INITIAL_CONTACT = "initial_contact"
    BATCH_REQUEST = "batch_request"
    FOLLOW_UP = "follow_up"
    CONFIRMATION = "confirmation"


class ResponseOutcome(enum.StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    NEEDS_FOLLOW_UP = "needs_follow_up"


class PhoneCallStatus(enum.StrEnum):
    SCHEDULED = "scheduled"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DeadLetterStatus(enum.StrEnum):
    PENDING = "pending"
    REPLAYED = "replayed"


class InboundMailKind(enum.StrEnum):
    """What a message in the service's mailbox is."""

    REPLY = "reply"
    AUTO_REPLY = "auto_reply"
    BOUNCE = "bounce"
    DELAYED = "delayed"
    UNRELATED = "unrelated"


class InboundMailState(enum.StrEnum):
    # Matched to an email and applied (a reply recorded, a bounce noted, ...).
    MATCHED = "matched"
    # Kept for operators: no email found, or nothing to match (unrelated mail).
    UNMATCHED = "unmatched"
    # An operator decided it needs nothing.
    IGNORED = "ignored"
