"""The communication service: therapist emails and follow-up calls, as Celery tasks.

``celery -A comms_tasks worker`` finds the app here.
"""

from comms_tasks.app import app

__all__ = ["app"]
