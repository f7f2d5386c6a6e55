"""Every start-up measure of the `titans` command, with what each buys.

Measured in fresh processes on 2 CPUs (benchmarks/README.md has the runs); a measure that
bought less than 0.1 s would not be here:

| measure | buys | where |
|---|---|---|
| import Beam without its model manager and BigQuery/Pub/Sub re-exports (``import_beam``) | ~0.3 s every command | here |
| ... and, for a job in this process that names no URL, without the GCS, S3 and Azure filesystems and the Dataflow API client (``HIDDEN_LOCAL``) | ~0.1 s | here; ``storage`` loads the filesystems on a URL |
| DoFn introspection memoized (``memoize_dofn_specs``) | ~0.1 s of a run | here |
| bundles end without waiting up to 200 ms for Beam's state sampler (``shorten_state_sampling``) | ~0.15 s of a 1M-row run | here |
| the cyclic garbage collector paused during start-up (``pause_gc`` / ``resume_gc``) | ~0.4 s of a 1M-row run | here; ``run_job`` resumes it |
| Arrow's buffers from jemalloc, not mimalloc (``choose_arrow_allocator``) | ~0.1 s of a 1M-row run | here |
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
stay missing from the package namespace. When the job runs in this process
(``main._starts_nothing_outside``) and no argument names a URL, the GCS, S3 and Azure
filesystems (each guarded the same way in ``apache_beam.io.filesystems``; GCS's imports
google.cloud.storage, requests and google.auth) and the Dataflow API client (guarded in Beam's
Dataflow runner, which an in-process job never uses) are left out as well; a URL met later
(in a state pointer, say) loads its filesystem in ``titans.transforms.io.storage``, as Beam
finds filesystems by their class when it is asked for one.

**The allocator.** pyarrow 25 allocates from mimalloc by default. A titans job allocates and
frees batch-sized buffers at every step of every batch (decoded columns, the split, the
writers' pages) across its reading, main and writing threads; with mimalloc that cost ~0.1 s more
processing per 1M rows than with jemalloc or the system allocator (1.23-1.25 s against
1.13-1.14 s, 2 CPUs, measured). The command sets ``ARROW_DEFAULT_MEMORY_POOL`` (read once,
when Arrow first allocates) unless the user has.

**The collector.** Start-up allocates millions of objects that live as long as the process
(torch, Beam, the pipeline graph), and the collector scanned them all in ~5 full
collections. The command pauses it first thing; ``run_job`` resumes it before the job runs,
after freezing what start-up made (never garbage; later collections skip it), so a long job
still collects its own garbage. Only a pause made here is resumed.
"""
from __future__ import annotations

import gc
import os
import sys

from titans.transforms.io.storage import URL_FILESYSTEMS


HIDDEN = ("apache_beam.ml.inference.model_manager", "apache_beam.io.gcp.bigquery")
# left out too when the job runs in this process and names no URL (``import_beam(local=True)``)
HIDDEN_LOCAL = URL_FILESYSTEMS + ("google.cloud.dataflow",)


def import_beam(local: bool = False) -> None:
    """Beam's first import in this process, without the modules HIDDEN (and HIDDEN_LOCAL
    when ``local``), and with DoFn introspection memoized (``memoize_dofn_specs``)."""
    if "apache_beam.ml.inference.base" in sys.modules:
        return
    hidden = [name for name in HIDDEN + (HIDDEN_LOCAL if local else ()) if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # `import` / `from ... import` now raise ImportError
    try:
        import apache_beam.ml.inference.base as base
    finally:
        for name in hidden:
            sys.modules.pop(name, None)
    import resource

    base.resource = resource  # left out with the model manager by the same except clause
    memoize_dofn_specs()
    shorten_state_sampling()


def memoize_dofn_specs() -> None:
    """Beam asks for a DoFn's state and timer specs 8 times per DoFn (4 when it builds the
    graph, 2 more in its proto, 2 per copy the runner unpickles), and each answer inspects the
    signature of every method of the DoFn: 320 calls, 0.24 s of a run of titans' 40 ParDos
    (measured on a loaded machine; 0.04 s memoized). The answer depends on the DoFn's methods
    only, so it is kept per DoFn object (while that object lives) and handed out as fresh
    sets."""
    import weakref

    from apache_beam.transforms import userstate

    original = userstate.get_dofn_specs
    if getattr(original, "memoized", False):
        return
    memo: dict[int, tuple] = {}

    def get_dofn_specs(dofn):
        hit = memo.get(id(dofn))
        if hit is None or hit[0]() is not dofn:
            state, timers = original(dofn)
            try:
                hit = memo[id(dofn)] = (weakref.ref(dofn), frozenset(state), frozenset(timers))
            except TypeError:  # an object without weak references: asked afresh every time
                return state, timers
        return set(hit[1]), set(hit[2])

    get_dofn_specs.memoized = True
    userstate.get_dofn_specs = get_dofn_specs  # userstate's own callers look it up here too


SAMPLING_MS = 10


def shorten_state_sampling() -> None:
    """Beam's state sampler (time per step, for a runner's monitoring) runs a thread per
    bundle that sleeps in steps growing from 2 to 200 ms, and a bundle ends only when that
    thread wakes up to be stopped: 0-170 ms at the end of the 1-second bundle of a 1M-row job
    (processing 1.13 s or 0.94 s by where the sleep fell; 0.92-1.01 s sampling every 10 ms,
    measured). This process's bundles sample every SAMPLING_MS instead; a woken thread does a
    few additions, so sampling more often costs nothing measurable."""
    from apache_beam.runners.worker import statesampler

    statesampler.StateSampler.__init__.__defaults__ = (SAMPLING_MS,)


ARROW_POOL = "jemalloc"


def choose_arrow_allocator() -> None:
    """Before anything imports pyarrow (see **The allocator**); the user's setting wins."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", ARROW_POOL)


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
