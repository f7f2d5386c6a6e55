"""Timestamps a pipeline leaves for its report, as Beam metrics (the minimum over workers is
the first time it happened): when reading began."""
from __future__ import annotations

import time

from apache_beam.metrics import Metrics

FIRST_READ = "first_read_ms"


def stamp(name: str) -> None:
    Metrics.distribution("titans", name).update(int(time.time() * 1000))
