"""Thin Celery tasks, one module per pipeline stage. Importing this registers them all."""

from comms_tasks.tasks import inbound, outbox

__all__ = ["inbound", "outbox"]
