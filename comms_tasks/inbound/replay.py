"""TODO."""
from __future__ import annotations


class NotReplayable(LookupError):
    """The dead letter does not exist or was replayed already."""
