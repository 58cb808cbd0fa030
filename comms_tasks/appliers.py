"""What applies each inbound message, by task name: the stages' appliers in one table.

The tasks use their own; a dead-letter replay looks the message's task up here. Wiring
only: it imports the stages' tasks modules, whose inbound tasks register their appliers
(``inbound.runner.APPLIERS``, which the worker's batches read too), and only the worker's
plumbing, the ``comms`` command and tests import it.
"""

from __future__ import annotations

from comms_tasks.calls import tasks as call_tasks  # noqa: F401 - registers its tasks
from comms_tasks.emails import tasks as email_tasks  # noqa: F401 - registers its tasks
from comms_tasks.inbound import runner
from comms_tasks.inbound.inbox import Applier
from comms_tasks.projections import tasks as upstream_tasks  # noqa: F401 - registers its tasks

APPLIERS: dict[str, Applier] = runner.APPLIERS
