"""Timestamps a pipeline leaves for its report, as Beam metrics (the minimum over workers is
the first time it happened): when reading began and when the writers began to finalise."""
from __future__ import annotations

import time

from apache_beam.metrics import Metrics

FIRST_READ, FINALIZE = "first_read_ms", "finalize_start_ms"


def stamp(name: str) -> None:
    Metrics.distribution("titans", name).update(int(time.time() * 1000))
