"""RedBeat with the heartbeat of :mod:`comms_tasks.worker.beat_health` (production's beat).

A module of its own: importing ``redbeat`` connects its ``beat_init`` handler, which
expects a RedBeat scheduler, so only a beat that runs RedBeat imports it.
"""

from __future__ import annotations

from redbeat import RedBeatScheduler

from comms_tasks.worker.beat_health import Heartbeat


class HeartbeatRedBeatScheduler(Heartbeat, RedBeatScheduler):
    """RedBeat (production), with a heartbeat."""
