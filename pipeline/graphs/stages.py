"""The stages every titans pipeline shares: read the input, write the dead letter, and
finish with the report and the completion marker once every output file is in place."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.pvalue import AsList

from titans.transforms.io import storage
from titans.pipeline.graphs import counts
from titans.pipeline import overwrite
from titans.pipeline.failures import JobFailed
from titans.pipeline.graphs.counts import Count, Counts
from titans.pipeline.output_lock import release_by_job
# what a run writes into its output directory (named in outputs.py, which imports nothing)
from titans.pipeline.outputs import DEAD_LETTER, LABELS, OUTPUTS, PLOT, REPORT, SUCCESS  # noqa: F401
from titans.pipeline.plan import InputPlan
from titans.transforms.dead_letter import SCHEMA as DEAD_LETTER_SCHEMA
from titans.transforms.dead_letter import DeadLetter, ToDeadLetter
from titans.transforms.labels import AUDIT
from titans.transforms.io.parquet import WriteParquetBatches


FIRST = "first:"  # count keys of time stamps (epoch seconds), kept as their minimum
FIRST_READ = FIRST + "read"


def stamp_first_read(tables):
    """(FIRST_READ, now) per table read: when the runner began reading."""
    return tables | "StampFirstRead" >> beam.Map(lambda _: (FIRST_READ, time.time()))


def read_input(p: beam.Pipeline, plan: InputPlan, batch_size: int, file_keys=None):
    """(tables, dead-letter PCollection, [counts of rows in], (path, content key) of every file
    read: taken with ``file_keys`` by the readers, empty without; see ``manifest.Record``)."""
    read = p | "ReadBatches" >> plan.source.reader(batch_size, file_keys)
    rejected = read.dead_letter | "RejectedAtRead" >> beam.Map(lambda d: d.rows)
    return read.tables, read.dead_letter, [counts.rows(read.tables, Count.IN, "CountIn"),
                                           counts.rows(rejected, Count.IN, "CountInRejected"),
                                           stamp_first_read(read.tables)], read.keys


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


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """What the launcher knows before its job runs, handed to the job's last step, which
    writes the report once: when the command began (wall time runs from it), the runner's
    name, the launcher's phases up to ``p.run()`` and when the last of them ended, and
    ``whole_job(report, now)``: figures of a job this one is the last part of (`titans label`'s
    phases and wall time), added to the report before it is written. ``replace``
    (--overwrite): the last step replaces the previous outputs (``pipeline/overwrite.py``),
    setting them aside under ``run``, this job's id."""
    start: float
    runner: str | None = None
    phase_seconds: tuple = ()  # ((name, seconds), ...) in order
    launched_at: float | None = None
    whole_job: Callable[[dict, float], None] | None = None
    replace: bool = False
    run: str = ""


class Launch:
    """A job being built by a launcher: ``finish`` leaves the Finish step with it, to be applied
    by ``run_job`` once its own phases are marked (after the build, the output checks and
    --overwrite, right before ``p.run()``), with the ``JobRecord`` known then. Everything else
    in the graph is built before anything in the output is deleted."""

    def __init__(self, start: float):
        self.start = start
        self._finish: Callable[[JobRecord], None] | None = None

    def defer(self, apply: Callable[[JobRecord], None]) -> None:
        self._finish = apply

    def finish(self, record: JobRecord) -> None:
        if self._finish is None:
            raise RuntimeError("the pipeline was built without a Finish step")
        apply, self._finish = self._finish, None
        apply(record)


def finish(output: str, dead_parts: list, count_parts: list, written: list,
           build_report: Callable[[Counts, float], dict], job: float | Launch,
           plot: Callable[[dict, str], None] | None = None,
           on_complete: Callable[[dict, list], None] | None = None,
           inputs_read=None) -> None:
    """Write the dead letter; then, once every writer's bundles are committed (``written``:
    (destination, temporary paths) pairs), put every file in place, write the report and,
    if the job kept its promises, ``_SUCCESS``, then ``on_complete(report, inputs read)`` (the
    --skip-labeled manifest update; ``inputs_read``: the readers' (path, content key) pairs,
    a side input, so the graph carries no file list). ``job``: a ``Launch`` (the Finish step is applied when
    the launcher says), or when the command began (applied now, with nothing else known)."""
    dead = (dead_parts | "MergeDeadLetter" >> beam.Flatten()
            | "FormatDeadLetter" >> ToDeadLetter())
    writer = WriteParquetBatches(storage.join(output, DEAD_LETTER), DEAD_LETTER_SCHEMA)
    written = written + [(writer.destination, dead | "WriteDeadLetter" >> writer)]
    count_parts = count_parts + [counts.rows(dead, Count.DEAD_LETTER, "CountDeadLetter"),
                                 counts.reasons(dead, "CountReasons")]
    # every batch emits (key, rows) pairs (~100 of them with the histogram bins): summed per
    # key on the way (combiner lifting sums each bundle's pairs before the shuffle), so the
    # side input Finish waits for holds one pair per key, however many batches the job had;
    # a time stamp (FIRST) is kept as its earliest
    merged = count_parts | "MergeCounts" >> beam.Flatten()
    sums = (merged | "NotStamps" >> beam.Filter(lambda kv: not kv[0].startswith(FIRST))
            | "SumCounts" >> beam.CombinePerKey(sum))
    firsts = (merged | "Stamps" >> beam.Filter(lambda kv: kv[0].startswith(FIRST))
              | "FirstStamps" >> beam.CombinePerKey(min))
    pairs = (sums, firsts) | "CountsAndStamps" >> beam.Flatten()
    destinations = [d for d, _ in written]
    pipeline = dead.pipeline

    def apply(record: JobRecord) -> None:
        _ = (pipeline | "Once" >> beam.Create([None]) | "Finish" >> beam.Map(
            _Finish(output, destinations, build_report, record, plot, on_complete,
                    release_by_job(pipeline)),
            AsList(pairs), *[AsList(paths) for _, paths in written],
            **({} if inputs_read is None else {"inputs_read": AsList(inputs_read)})))

    if isinstance(job, Launch):
        job.defer(apply)
    else:
        apply(JobRecord(start=job))


class _Finish:
    """Build the report; with --overwrite move the previous outputs aside (``overwrite.py``);
    put every file in place, write the plot and report.json once, then _SUCCESS last, then
    delete what was moved aside. Over the dead-letter budget: the report, no _SUCCESS, then
    ``JobFailed`` raised so the job fails on its runner (a previous complete output is kept
    then, the report going to report.failed.json). It runs once every writer's bundles are
    committed: it takes their paths as side inputs. Everything the report says is known here:
    the counts and stamps of the job, the launcher's record (``JobRecord``) and this step's own
    clock. Retried, it rewrites the same files: renames skip files in place, the move aside is
    marked done."""

    def __init__(self, output: str, destinations: list, build_report, job: JobRecord, plot,
                 on_complete=None, release=None):
        self._output = output
        # the output lock, when the launcher does not wait for the job (output_lock): released
        # by this step, the job's last
        self._release = release
        self._destinations = destinations
        self._build = build_report
        self._job = job
        self._plot = plot
        self._on_complete = on_complete

    def __call__(self, _, pairs: list[tuple[str, int]], *written: list[str],
                 inputs_read=()) -> dict:
        finalize_started = time.time()
        replace = self._job.replace
        if replace:
            done = self._done_before()
            if done is not None:  # a retry of a step that ended: its outputs are final
                return self._end(*done)
        report = self._build(Counts(pairs), finalize_started - self._job.start)
        complete = report["status"] == "complete"
        # over the budget, a previous complete output is kept as it was (see overwrite.py)
        keep = replace and not complete and overwrite.previous_complete(self._output)
        if keep:
            for d in self._destinations:
                storage.delete_under(d.temp_dir)
            final, report_path = [], storage.join(self._output, overwrite.FAILED_REPORT)
        else:
            if replace:  # idempotent: a retried step finds the move done
                overwrite.move_aside(self._output, self._job.run,
                                     [d.temp_dir for d in self._destinations])
            final = [d.put_in_place(paths) for d, paths in zip(self._destinations, written)]
            report_path = storage.join(self._output, REPORT)
        started = time.time()
        report["output_files"] = sum(len(f) for f in final)
        if self._plot is not None and not keep:
            self._plot(report, storage.join(self._output, PLOT))
        now = self._timing(report, dict(pairs), finalize_started, started)
        if self._job.whole_job is not None:
            self._job.whole_job(report, now)
        if self._job.run:
            report["job_run_id"] = self._job.run  # how a retry of this step knows it ended
        storage.write_json(report_path, report)
        if complete:
            mark_complete(self._output, report)
            if self._on_complete is not None:
                self._on_complete(report, inputs_read)
        if replace and not keep:
            overwrite.delete_replaced(self._output)
        return self._end(report, report_path)

    def _done_before(self) -> tuple[dict, str] | None:
        """(report, its path) when this job's step ended already (a retried bundle whose
        first attempt finished): the move aside must not be done again on the new outputs."""
        for name in (REPORT, overwrite.FAILED_REPORT):
            path = storage.join(self._output, name)
            try:
                report = storage.read_json(path)
            except Exception:  # noqa: BLE001 - none there (or unreadable): not ended
                continue
            if report.get("job_run_id") == self._job.run and (
                    report.get("status") != "complete"
                    or storage.exists(storage.join(self._output, SUCCESS))):
                return report, path
        return None

    def _end(self, report: dict, report_path: str) -> dict:
        # the lock is released once the outputs are final, complete or failed; a step that
        # dies before (and is retried) keeps it; a job that dies leaves it for --overwrite
        if self._release is not None:
            self._release()
        if report["status"] != "complete":
            # the report is written; now the job fails, so every runner (and an Airflow task
            # waiting on Dataflow) sees it fail. A retry of this step rewrites the same files.
            raise JobFailed(report["status"], report_path)
        return report

    def _timing(self, report: dict, pairs: dict, finalize_started: float,
                started: float) -> float:
        """The runner, the models' rows and forward calls, and where the time went, from the
        launch (the record's start) to now: the launcher's phases, then runner start (to the
        first read), processing (to the writers' files being put in place), finalisation (to
        the report) and report and plot (to now)."""
        from titans.pipeline.phases import Phases

        job = self._job
        if job.runner is not None:
            report["runner"] = job.runner
        report["metrics"] = metrics(pairs.items())
        phases = Phases.resume(job.start, dict(job.phase_seconds),
                               job.start if job.launched_at is None else job.launched_at)
        if FIRST_READ in pairs:
            phases.mark("runner_start", pairs[FIRST_READ])
        phases.mark("processing", finalize_started)
        phases.mark("finalisation", started)
        phases.mark("report_and_plot")
        report["phase_seconds"] = phases.seconds
        wall = phases.last - job.start
        report["wall_seconds"] = round(wall, 3)
        report["rows_per_second"] = round(report["rows_in"] / wall, 1) if wall > 0 else None
        return phases.last


METRIC = "metric:"  # count keys of report.json's metrics: "metric:student_rows", ...


def metrics(pairs) -> dict[str, int]:
    """report.json's ``metrics`` from the job's count pairs: {"student_rows": n, ...} (the
    figures of Beam's counters, which only a launcher that waits could read, after the job;
    see ``model_counts``)."""
    totals: dict[str, int] = {}
    for key, n in pairs:
        if key.startswith(METRIC):
            totals[key[len(METRIC):]] = totals.get(key[len(METRIC):], 0) + n
    return dict(sorted(totals.items()))


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
