"""The stages every titans pipeline shares: read the input, write the dead letter, and
finish with the report and the completion marker once every output file is in place."""
from __future__ import annotations

import time
from typing import Callable

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.pvalue import AsList

from titans.transforms.io import storage
from titans.pipeline.graphs import counts
from titans.pipeline.graphs.counts import Count, Counts
from titans.pipeline.output_lock import release_by_job
# what a run writes into its output directory (named in outputs.py, which imports nothing)
from titans.pipeline.outputs import DEAD_LETTER, LABELS, OUTPUTS, PLOT, REPORT, SUCCESS  # noqa: F401
from titans.pipeline.plan import InputPlan
from titans.transforms.dead_letter import SCHEMA as DEAD_LETTER_SCHEMA
from titans.transforms.dead_letter import DeadLetter, ToDeadLetter
from titans.transforms.labels import AUDIT
from titans.transforms.io.parquet import WriteParquetBatches


def read_input(p: beam.Pipeline, plan: InputPlan, batch_size: int):
    """(tables, dead-letter PCollection, [counts of rows in])."""
    read = p | "ReadBatches" >> plan.source.reader(batch_size)
    rejected = read.dead_letter | "RejectedAtRead" >> beam.Map(lambda d: d.rows)
    return read.tables, read.dead_letter, [counts.rows(read.tables, Count.IN, "CountIn"),
                                           counts.rows(rejected, Count.IN, "CountInRejected")]


def write_labels(tables, label: str, output: str, schema, output_format: str, prefix: str):
    """Labeled tables -> ``output/labels/PREFIX-*`` as Parquet or TFRecord (tf.train.Example,
    every column a feature): (destination, temporary paths), for ``finish`` to put in place."""
    directory = storage.join(output, LABELS)
    if output_format == "tfrecord":
        from titans.transforms.io.tfrecord import WriteTFRecordBatches as write
    else:
        write = WriteParquetBatches
    writer = write(directory, schema, prefix=prefix)
    return writer.destination, tables | label >> writer


def tables_typed(pcoll):
    """Declare a RunInference output as pa.Table so Beam codes and sizes it with the Arrow
    coder (its default, pickle, serialises every batch just to sample its size). RunInference
    with exception handling rejects an output type hint, so it is set on the PCollection."""
    pcoll.element_type = pa.Table
    return pcoll


def failures(dlq, stage: str, input_names: list[str]):
    """RunInference's failed batches (an error outside the model's forward, which isolates
    its own failures row by row) -> DeadLetter per table, input columns only. Audited easy
    rows are dropped: they are labeled by the student already."""
    def to_dead_letter(failure):
        tables, (_, exc_repr, _) = failure
        for table in tables:
            if AUDIT in table.column_names:
                table = table.filter(pc.invert(table.column(AUDIT)))
            yield DeadLetter(table.select(input_names), f"{stage} stage failed on this batch: "
                                                        f"{exc_repr}", stage)
    return dlq.failed_inferences | f"{stage.title()}Failures" >> beam.FlatMap(
        to_dead_letter).with_output_types(DeadLetter)


def finish(output: str, dead_parts: list, count_parts: list, written: list,
           build_report: Callable[[Counts, float], dict], start_time: float,
           plot: Callable[[dict, str], None] | None = None,
           on_complete: Callable[[dict], None] | None = None) -> None:
    """Write the dead letter; then, once every writer's bundles are committed (``written``:
    (destination, temporary paths) pairs), put every file in place, write the report and,
    if the job kept its promises, ``_SUCCESS``, then ``on_complete(report)`` (the
    --skip-labeled manifest update)."""
    dead = (dead_parts | "MergeDeadLetter" >> beam.Flatten()
            | "FormatDeadLetter" >> ToDeadLetter())
    writer = WriteParquetBatches(storage.join(output, DEAD_LETTER), DEAD_LETTER_SCHEMA)
    written = written + [(writer.destination, dead | "WriteDeadLetter" >> writer)]
    count_parts = count_parts + [counts.rows(dead, Count.DEAD_LETTER, "CountDeadLetter"),
                                 counts.reasons(dead, "CountReasons")]
    # every batch emits (key, rows) pairs (~100 of them with the histogram bins): summed per
    # key on the way (combiner lifting sums each bundle's pairs before the shuffle), so the
    # side input Finish waits for holds one pair per key, however many batches the job had
    pairs = (count_parts | "MergeCounts" >> beam.Flatten()
             | "SumCounts" >> beam.CombinePerKey(sum))
    destinations = [d for d, _ in written]
    _ = (dead.pipeline | "Once" >> beam.Create([None]) | "Finish" >> beam.Map(
        _Finish(output, destinations, build_report, start_time, plot, on_complete,
                release_by_job(dead.pipeline)),
        AsList(pairs), *[AsList(paths) for _, paths in written]))


class _Finish:
    """Put every file in place, write report.json (and the plot), then _SUCCESS last. It
    runs once every writer's bundles are committed: it takes their paths as side inputs."""

    def __init__(self, output: str, destinations: list, build_report, start_time: float, plot,
                 on_complete=None, release=None):
        self._output = output
        # the output lock, when the launcher does not wait for the job (output_lock): released
        # by this step, the job's last
        self._release = release
        self._destinations = destinations
        self._build = build_report
        self._start = start_time
        self._plot = plot
        self._on_complete = on_complete

    def __call__(self, _, pairs: list[tuple[str, int]], *written: list[str]) -> dict:
        finalize_started = time.time()
        final = [d.put_in_place(paths) for d, paths in zip(self._destinations, written)]
        started = time.time()
        report = self._build(Counts(pairs), started - self._start)
        # split the launcher's phase_seconds: processing | finalisation | report
        report["finalize_started_at"], report["finish_started_at"] = finalize_started, started
        report["output_files"] = sum(len(f) for f in final)
        storage.write_json(storage.join(self._output, REPORT), report)
        if self._plot is not None:
            self._plot(report, storage.join(self._output, PLOT))
        if report["status"] == "complete":
            mark_complete(self._output, report)
            if self._on_complete is not None:
                self._on_complete(report)
        if self._release is not None:
            self._release()
        return report


def mark_complete(output: str, report: dict) -> None:
    """``_SUCCESS``: the last file a job writes; downstream readers wait for it."""
    storage.write_json(storage.join(output, SUCCESS), {
        "rows_in": report["rows_in"], "rows_dead_letter": report["rows_dead_letter"],
        "report": REPORT})


def job_status(counts: Counts, max_dead_letter_rate: float) -> dict:
    """The report's status and conservation fields, shared by every pipeline."""
    rows_in, dead = counts[Count.IN], counts[Count.DEAD_LETTER]
    rate = dead / rows_in if rows_in else 0.0
    exceeded = rate > max_dead_letter_rate
    return {
        "status": (f"failed: {rate:.2%} of rows went to the dead letter, more than "
                   f"--max-dead-letter-rate {max_dead_letter_rate:g}; this usually means a wrong "
                   f"flag (feature columns, model), not bad data" if exceeded else "complete"),
        "dead_letter_rate": rate,
        "dead_letter_budget_exceeded": exceeded,
    }
