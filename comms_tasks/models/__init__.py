"""Tables only. Importing this package registers every table on ``Base.metadata``."""

from comms_tasks.models.base import SCHEMA, Base
from comms_tasks.models.email import Email, EmailBatch
from comms_tasks.models.enums import (
    DeadLetterStatus,
    EmailStatus,
    EmailTemplate,
    InboundMailKind,
    InboundMailState,
    PhoneCallStatus,
    PlacementRequestStatus,
    ResponseOutcome,
    TherapistStatus,
)
from comms_tasks.models.inbound_mail import InboundMail, MailboxPoll
from comms_tasks.models.messaging import (
    DeadLetter,
    OutboxEvent,
    ProcessedMessage,
    TaskDelivery,
    TaskRun,
)
from comms_tasks.models.phone_call import PhoneCall, PhoneCallBatch
from comms_tasks.models.read_models import Patient, PlacementRequest, Therapist

__all__ = [
    "SCHEMA",
    "Base",
    "DeadLetter",
    "DeadLetterStatus",
    "Email",
    "EmailBatch",
    "EmailStatus",
    "EmailTemplate",
    "InboundMail",
    "InboundMailKind",
    "InboundMailState",
    "MailboxPoll",
    "OutboxEvent",
    "Patient",
    "PhoneCall",
    "PhoneCallBatch",
    "PhoneCallStatus",
    "PlacementRequest",
    "PlacementRequestStatus",
    "ProcessedMessage",
    "ResponseOutcome",
    "TaskDelivery",
    "TaskRun",
    "Therapist",
    "TherapistStatus",
]
