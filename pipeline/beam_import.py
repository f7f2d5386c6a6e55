"""Import Beam for a titans command, without the part of RunInference titans never uses.

``apache_beam.ml.inference.base`` imports its model manager (scipy.optimize and more: ~0.3 s
of every command's start, measured) inside a ``try/except ImportError`` that leaves it out
when it is missing. titans does not use the model manager, so the command line hides it
while Beam is first imported; Beam imports it again by itself if a pipeline ever asks for it.
Only the command line does this: a library user, a test or a Dataflow worker imports Beam
as it is.
"""
from __future__ import annotations

import sys

_MODEL_MANAGER = "apache_beam.ml.inference.model_manager"


def import_beam() -> None:
    if "apache_beam.ml.inference.base" in sys.modules:
        return
    sys.modules[_MODEL_MANAGER] = None  # `from ... import` now raises ImportError
    try:
        import apache_beam.ml.inference.base as base
    finally:
        sys.modules.pop(_MODEL_MANAGER, None)
    import resource

    base.resource = resource  # left out with the model manager by the same except clause
