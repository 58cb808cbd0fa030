"""Peak RSS of a worker's pool processes, per stage (Linux ``/proc``).

At a stage's start the kernel's high-water mark of each process is reset (``clear_refs``
with ``5``); at its end ``VmHWM`` is that stage's peak. Where the reset is not allowed, a
sampler thread keeps the highest RSS it saw every 20 ms instead.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

SAMPLE_SECONDS = 0.02


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return sorted(set(found))


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class StagePeak:
    """Peak RSS (MB) of ``main_pid`` and its children between ``start()`` and ``stop()``."""

    def __init__(self, main_pid: int) -> None:
        self.main_pid = main_pid
        self._resettable = True
        self._sampled: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _pids(self) -> list[int]:
        return [self.main_pid, *children(self.main_pid)]

    def start(self) -> None:
        for pid in self._pids():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                self._resettable = False
        self._sampled = {}
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            for pid in self._pids():
                rss = _status_kb(pid, "VmRSS")
                if rss is not None:
                    self._sampled[pid] = max(self._sampled.get(pid, 0), rss)

    def stop(self) -> dict[str, float]:
        """``{"main": MB, "pool-1": MB, ...}``: the peak of each process in this stage."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peaks: dict[str, float] = {}
        for index, pid in enumerate(self._pids()):
            peak = _status_kb(pid, "VmHWM") if self._resettable else None
            peak = max(peak or 0, self._sampled.get(pid, 0))
            name = "main" if index == 0 else f"pool-{index}"
            peaks[name] = round(peak / 1024, 1)
        return peaks


def memory_cells(memory: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """The memory row of a bench table: stage, service, baseline, figure, target."""
    return ("memory", f"{memory['highest_mb']:.0f} MB peak", "-", "per process", memory["target"])
