"""Beat's liveness: its scheduler touches a heartbeat file at every tick; a check reads it.

``python -m comms_tasks.worker.beat_health`` exits 0 when the file was touched within
``--max-age`` seconds (default 60: beat ticks at least every 5 s, the outbox relay's
interval), 1 otherwise, with one line saying why. Compose's beat healthcheck runs it.
A standby RedBeat beat waits for the lock before its first tick, so it reports
unhealthy until it takes over.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from celery.beat import PersistentScheduler

from comms_tasks.settings import get_settings

HEARTBEAT_NAME = "beat-heartbeat"
DEFAULT_MAX_AGE_SECONDS = 60


def heartbeat_path() -> Path:
    return get_settings().var_dir / HEARTBEAT_NAME


class Heartbeat:
    def tick(self, *args: Any, **kwargs: Any) -> Any:
        interval = super().tick(*args, **kwargs)  # type: ignore[misc]
        path = heartbeat_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return interval


class HeartbeatPersistentScheduler(Heartbeat, PersistentScheduler):
    """The file scheduler (embedded default), with a heartbeat."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_SECONDS)
    arguments = parser.parse_args(argv)
    path = heartbeat_path()
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        print(f"beat has not ticked yet ({path} missing)", file=sys.stderr)
        return 1
    if age > arguments.max_age:
        print(
            f"beat last ticked {age:.0f} s ago (more than {arguments.max_age:.0f} s)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
