"""Every task name of the service, once: the tasks, beat's schedule, the ``comms`` command,
the bench and the dead-letter table all use these. The names are part of the contract."""

from __future__ import annotations

# Called by other services (see docs/contracts/).
HANDLE_THERAPIST_EVENT = "comms.handle_therapist_event"
HANDLE_MATCHING_EVENT = "comms.handle_matching_event"
HANDLE_PATIENT_EVENT = "comms.handle_patient_event"
RECORD_EMAIL_RESPONSE = "comms.record_email_response"
RECORD_CALL_OUTCOME = "comms.record_call_outcome"
QUEUE_EMAIL = "comms.queue_email"
SCHEDULE_CALL = "comms.schedule_call"

# Started by beat, by each other, or by an operator.
BATCH_REQUESTS = "comms.batch_requests"
SEND_EMAIL = "comms.send_email"
FOLLOW_UP_CHECK = "comms.follow_up_check"
SCHEDULE_CALLS = "comms.schedule_calls"
POLL_MAILBOX = "comms.poll_mailbox"
RELAY_OUTBOX = "comms.relay_outbox"
PURGE_EXPIRED = "comms.purge_expired"
