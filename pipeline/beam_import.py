"""Import Beam for a titans command, without the parts of it titans never uses.

Two of Beam's imports sit inside a ``try/except ImportError`` that leaves them out when they
are missing, and cost every command start-up time (measured, fresh processes on 2 CPUs):

- ``apache_beam.ml.inference.base`` imports its model manager (scipy.optimize and more),
  ~0.3 s; titans does not use the model manager.
- ``apache_beam.io`` re-exports BigQuery, Pub/Sub and the cross-language IOs from a block
  that starts with ``apache_beam.io.gcp.bigquery``, ~0.3 s; titans reads and writes files.

So the command line hides those modules while Beam is first imported (a ``None`` in
``sys.modules`` makes their import raise ImportError), then unhides them: anything that asks
for them later (``from apache_beam.io.gcp.bigquery import ...``, a Dataflow launch that
needs them) imports them as usual. Only the names ``apache_beam.io.ReadFromBigQuery`` and
the like stay missing from the package namespace, which titans never uses. Only the command
line does this: a library user, a test or a Dataflow worker imports Beam as it is.
"""
from __future__ import annotations

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
