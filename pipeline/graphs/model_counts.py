"""Rows and forward calls per model, counted in the pipeline: report.json's ``metrics``.

Beam's counters hold the same figures (``{model}_rows``, ``{model}_forward_calls``), but only
a launcher that waits can read them, after the job; the job's last step writes the report, so
it gets them as count pairs like every other figure. A forward call happens inside the model
handler, so ``CountingHandler`` notes how many forward calls each batch took on the first table
it returns (schema metadata); ``counted`` takes the note off again right after RunInference and
emits the batch's pairs: the rows the model ran on (rows whose features could be read) and the
forward calls.
"""
from __future__ import annotations

import threading

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

from titans.pipeline.graphs.stages import METRIC, tables_typed
from titans.transforms.dead_letter import VALIDATE
from titans.transforms.inference import ArrowModelHandler
from titans.transforms.labels import ERROR_STAGE

_CALLS = b"titans:forward_calls"  # the note on a batch's first table, until ``counted``


class CountingHandler(ArrowModelHandler):
    """An ArrowModelHandler whose batches say how many forward calls they took."""

    def run_inference(self, batch, model, inference_args=None) -> list[pa.Table]:
        tally = self._tally()
        tally.calls = 0
        out = super().run_inference(batch, model, inference_args)
        if out:
            first = out[0]
            out[0] = first.replace_schema_metadata(
                {**(first.schema.metadata or {}), _CALLS: str(tally.calls).encode()})
        return out

    def forward(self, model, x):
        y = super().forward(model, x)  # raises on failure: a failed call is not counted
        self._tally().calls += -(-len(x) // self.forward_chunk(model))
        return y

    def _tally(self) -> threading.local:
        tally = self.__dict__.get("_forward_tally")
        if tally is None:
            tally = self.__dict__.setdefault("_forward_tally", threading.local())
        return tally

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_forward_tally", None)  # per process and thread, never pickled
        return state


class _Counted(beam.DoFn):
    PAIRS = "pairs"

    def __init__(self, model: str):
        self._rows, self._calls = f"{METRIC}{model}_rows", f"{METRIC}{model}_forward_calls"

    def process(self, table: pa.Table):
        metadata = table.schema.metadata or {}
        if _CALLS in metadata:
            yield beam.pvalue.TaggedOutput(self.PAIRS, (self._calls, int(metadata[_CALLS])))
            rest = {k: v for k, v in metadata.items() if k != _CALLS}
            table = table.replace_schema_metadata(rest or None)
        unread = 0
        if ERROR_STAGE in table.column_names:  # rows whose features could not be read
            unread = int(pc.sum(pc.equal(table.column(ERROR_STAGE), VALIDATE)).as_py() or 0)
        yield beam.pvalue.TaggedOutput(self.PAIRS, (self._rows, table.num_rows - unread))
        yield table


def counted(scored, model: str, label: str):
    """(RunInference's tables, as they were; their (metric key, n) count pairs). The tables
    are declared pa.Table on the way in too: untyped, Beam pickles a whole batch each time
    it samples an element's size (745 MB pickled in a 4M-row run)."""
    out = tables_typed(scored) | label >> beam.ParDo(_Counted(model)).with_outputs(
        _Counted.PAIRS, main="tables")
    return out.tables, out[_Counted.PAIRS]
