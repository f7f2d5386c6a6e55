"""Every start-up measure of the `titans` command, with what each buys.

Measured in fresh processes on 2 CPUs (benchmarks/README.md has the runs); a measure that
bought less than 0.1 s would not be here:

| measure | buys | where |
|---|---|---|
| import Beam without its model manager and BigQuery/Pub/Sub re-exports (``import_beam``) | ~0.3 s every command | here |
| the cyclic garbage collector paused during start-up (``pause_gc`` / ``resume_gc``) | ~0.4 s of a 1M-row run | here; ``run_job`` resumes it |
| report.png drawn by a helper process started first thing | ~0.2 s at the end of a run | ``titans.pipeline.report_plot`` (the helper is that module's ``__main__``) |

Only the command line takes these measures: a library user, a test or a Dataflow worker
imports Beam as it is and keeps its own collector settings.

**Beam.** Two of Beam's imports sit inside a ``try/except ImportError`` that leaves them out
when they are missing: ``apache_beam.ml.inference.base`` imports its model manager
(scipy.optimize and more), and ``apache_beam.io`` re-exports BigQuery, Pub/Sub and the
cross-language IOs from a block that starts with ``apache_beam.io.gcp.bigquery``. titans uses
neither. So the command hides those modules while Beam is first imported (a ``None`` in
``sys.modules`` makes their import raise ImportError), then unhides them: anything that asks
for them later imports them as usual. Only names like ``apache_beam.io.ReadFromBigQuery``
stay missing from the package namespace.

**The collector.** Start-up allocates millions of objects that live as long as the process
(torch, Beam, the pipeline graph), and the collector scanned them all in ~5 full
collections. The command pauses it first thing; ``run_job`` resumes it before the job runs,
after freezing what start-up made (never garbage; later collections skip it), so a long job
still collects its own garbage. Only a pause made here is resumed.
"""
from __future__ import annotations

import gc
import sys


HIDDEN = ("apache_beam.ml.inference.model_manager", "apache_beam.io.gcp.bigquery")


def import_beam() -> None:
    if "apache_beam.ml.inference.base" in sys.modules:
        return
    hidden = [name for name in HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # `import` / `from ... import` now raise ImportError
    try:
        import apache_beam.ml.inference.base as base
    finally:
        for name in hidden:
            sys.modules.pop(name, None)
    import resource

    base.resource = resource  # left out with the model manager by the same except clause

_paused = False


def pause_gc() -> None:
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_gc() -> None:
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
