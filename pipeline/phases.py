"""Where a run's wall time goes, phase by phase: report.json's ``phase_seconds``.

Phases are consecutive: ``mark(name)`` ends the phase that began at the previous mark, so
they add up to the wall time from the process's start. The launcher marks its phases up to
``p.run()`` and hands them to the job (``stages.JobRecord``), whose last step goes on marking
from there with the times it sees: the first read, the writers' files in place, its own clock.
"""
from __future__ import annotations

import logging
import os
import time

_LOG = logging.getLogger("titans")


def process_start() -> float:
    """When this process started (epoch seconds, ~10 ms): its age from /proc on Linux, so
    the interpreter's own start-up and imports count; now elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


class Phases:
    def __init__(self, start: float | None = None):
        self.start = process_start() if start is None else start
        self._last = self.start
        self.seconds: dict[str, float] = {}

    @classmethod
    def resume(cls, start: float, seconds: dict[str, float], last: float) -> "Phases":
        """Phases marked elsewhere (``seconds``, the last of them ending at ``last``), to go on
        marking from."""
        phases = cls(start)
        phases.seconds, phases._last = dict(seconds), max(start, last)
        return phases

    @property
    def last(self) -> float:
        """When the last phase ended (the start, before any)."""
        return self._last

    def mark(self, name: str, at: float | None = None) -> None:
        """The phase ``name`` ended ``at`` (now by default)."""
        at = time.time() if at is None else at
        self.seconds[name] = round(self.seconds.get(name, 0.0) + max(0.0, at - self._last), 3)
        self._last = max(self._last, at)

    def line(self) -> str:
        return ", ".join(f"{name.replace('_', ' ')} {s:.2f} s" for name, s in self.seconds.items())


def mark(phases: Phases | None, name: str) -> None:
    """``phases.mark(name)`` when a run is being timed."""
    if phases is not None:
        phases.mark(name)
