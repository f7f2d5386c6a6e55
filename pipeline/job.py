"""Running a planned job, with the output protocol a labeling job promises.

1. Everything that can fail before the data is touched is checked first: the plan's launch
   checks, then the pipeline options and runner (building the pipeline), then a write probe
   into the output directory.
2. Only then does ``--overwrite`` delete a previous run's outputs: every object under
   ``labels/`` and ``dead_letter/`` (temp files of a killed run included) and the report
   files, on any filesystem (object stores are listed by prefix).
3. The pipeline writes its files through temp-file-and-rename, then report.json, then
   ``_SUCCESS`` last (see ``stages.finish``). Without ``_SUCCESS`` an output is incomplete
   (a killed run) or failed (over the dead-letter budget).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from titans.models import storage
from titans.pipeline import collector
from titans.pipeline.options import pipeline_options  # shared with describe
from titans.pipeline.phases import Phases
from titans.pipeline.stages import OUTPUTS, REPORT, mark_complete
from titans.transforms.timing import FIRST_READ

_LOG = logging.getLogger("titans")

Build = Callable[[beam.Pipeline, object, float], None]


def prepare_output(output: str, overwrite: bool) -> None:
    """Probe that ``output`` is writable; with ``overwrite``, then remove a previous run's
    outputs (only those: other files in the directory are left alone)."""
    if not storage.is_url(output):
        try:
            os.makedirs(output, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create output directory {output!r}: {e}") from e
    probe = storage.join(output, "_titans_write_probe")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except Exception as e:  # noqa: BLE001 - read-only, no permission, no bucket...
        raise ValueError(f"cannot write to output directory {output!r}: {e}") from e
    if not overwrite:
        return
    removed = sum(storage.delete_under(storage.join(output, name)) for name in OUTPUTS[:2])
    for name in OUTPUTS[2:]:
        path = storage.join(output, name)
        if storage.exists(path):
            storage.delete(path)
            removed += 1
    others = storage.list_under(output)
    _LOG.info("--overwrite: removed %d file(s) of a previous run from %s%s", removed, output,
              f"; left {len(others)} other file(s) alone" if others else "")


def run_job(plan, build: Build, beam_args: list[str], start: float | None = None,
            wait: bool = True, phases: Phases | None = None) -> dict:
    """Run a planned job to the end and return its report; ``start``: when the command began.

    ``wait=False``: return as soon as the runner has the job (a Dataflow job submitted, or
    its graph written for a Flex Template launch) with ``{"status": "submitted", ...}``; the
    job writes report.json and ``_SUCCESS`` itself when it is done (see ``stages.finish``),
    without the fields this function adds after waiting (wall time from launch, runner,
    counters). A Flex Template's launcher must not wait for its job."""
    start = time.time() if start is None else start
    phases = Phases(start) if phases is None else phases
    options = pipeline_options(beam_args)
    try:
        p = beam.Pipeline(options=options)  # an unknown runner fails here, before any deletion
    except ValueError as e:
        raise ValueError(f"pipeline options: {e}") from e
    build(p, plan, start)
    output = plan.config.output
    prepare_output(output, plan.config.overwrite)
    phases.mark("pipeline_construction")
    collector.resume()  # if the command line paused it for start-up
    result = p.run()
    if not wait:
        return submitted(result, options, output)
    result.wait_until_finish()
    # the in-pipeline report timed the pipeline only: restate wall time as launch-to-finish
    report = storage.read_json(storage.join(output, REPORT))
    report["runner"] = str(options.view_as(StandardOptions).runner)
    report["metrics"] = titans_counters(result)
    for name, at in (("runner_start", _first(result, FIRST_READ)),
                     ("processing", report.pop("finalize_started_at", None)),
                     ("finalisation", report.pop("finish_started_at", None))):
        if at is not None:
            phases.mark(name, at)
    phases.mark("report_and_plot")
    report["phase_seconds"] = phases.seconds
    wall = time.time() - phases.start
    report["wall_seconds"] = round(wall, 3)
    report["rows_per_second"] = round(report["rows_in"] / wall, 1) if wall > 0 else None
    storage.write_json(storage.join(output, REPORT), report)
    _LOG.info("where the time went: %s", phases.line())
    if report["status"] == "complete":
        mark_complete(output, report)  # again, so that _SUCCESS stays the last file written
    return report


def submitted(result, options: PipelineOptions, output: str) -> dict:
    """What run_job(wait=False) returns: the job is the runner's now."""
    job_id = None
    if getattr(result, "has_job", False):  # DataflowPipelineResult; None for a template launch
        job_id = result.job_id()
    return {"status": "submitted", "job_id": job_id,
            "runner": str(options.view_as(StandardOptions).runner),
            "output": output, "report": storage.join(output, REPORT)}


def submit_nothing(beam_args: list[str], message: str) -> None:
    """A one-step job that logs ``message``: what a launcher that must hand the runner a job
    submits when there is nothing to label (a Flex Template launch that leaves no job behind
    is reported as a failed launch, which would fail the schedule that started it)."""
    p = beam.Pipeline(options=pipeline_options(beam_args))
    _ = p | "NothingToLabel" >> beam.Create([message]) | "Log" >> beam.Map(_log_info)
    p.run()


def _log_info(message: str) -> None:
    _LOG.info("%s", message)


def _first(result, name: str) -> float | None:
    """The earliest time (epoch seconds) a ``transforms.timing`` stamp was left, if any."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        found = result.metrics().query(MetricsFilter().with_namespace("titans").with_name(name))
        values = [d.committed or d.attempted for d in found["distributions"]]
        return min(v.min for v in values if v is not None and v.count) / 1000.0
    except (NotImplementedError, KeyError, AttributeError, ValueError):  # no metrics, no stamp
        return None


def titans_counters(result) -> dict:
    """The pipeline's own counters (rows and forward calls per model), summed over workers."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        counters = result.metrics().query(MetricsFilter().with_namespace("titans"))["counters"]
    except (NotImplementedError, KeyError, AttributeError):  # runners without metrics
        return {}
    totals: dict[str, int] = {}
    for c in counters:
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
    return dict(sorted(totals.items()))


def run_cascade(plan, beam_args: list[str], start: float | None = None,
                wait: bool = True, phases: Phases | None = None) -> dict:
    from titans.pipeline.cascade import build_pipeline

    return run_job(plan, build_pipeline, beam_args, start, wait, phases)


def run_teacher_label(plan, beam_args: list[str], start: float | None = None,
                      wait: bool = True, phases: Phases | None = None) -> dict:
    from titans.pipeline.teacher_label import build_pipeline

    return run_job(plan, build_pipeline, beam_args, start, wait, phases)


def launch(config, beam_args: list[str], start: float | None = None, *,
           describe: bool = False, wait: bool = True) -> int:
    """Plan, run and summarise a `titans run` (RunConfig) or `titans teacher-label`
    (TeacherLabelConfig) job; the command's exit code: 0 done (or nothing to label under
    --skip-labeled), 1 the job failed its dead-letter budget (report written, no _SUCCESS),
    2 a launch check failed. ``describe``: plan and build, print the pipeline as JSON, run
    nothing; ``wait=False``: return once the runner has the job (see run_job)."""
    phases = Phases()
    if start is not None:
        phases.mark("startup", start)  # the interpreter, titans' command line, parsing
    from titans.pipeline.manifest import NothingToLabel
    from titans.pipeline.plan import RunConfig, plan_run, plan_teacher_label
    from titans.pipeline.report import summary

    phases.mark("imports")  # torch, pyarrow, Beam (through the plan's modules)
    cascade = isinstance(config, RunConfig)
    command = "run" if cascade else "teacher-label"
    try:
        plan = plan_run(config, phases) if cascade else plan_teacher_label(config, phases)
        if describe:
            from titans.pipeline import cascade as cascade_pipeline, teacher_label
            from titans.pipeline.describe import describe_job, to_json

            build = (cascade_pipeline if cascade else teacher_label).build_pipeline
            print(to_json(describe_job(plan, build, beam_args, command)))
            return 0
        report = (run_cascade if cascade else run_teacher_label)(plan, beam_args, start, wait,
                                                                 phases)
    except NothingToLabel as e:  # --skip-labeled: every input file is labeled already
        print(f"titans {command}: {e}")
        if not wait:
            submit_nothing(beam_args, f"titans {command}: {e}")
        return 0
    except ValueError as e:  # launch-time checks: say what to fix, no traceback
        print(f"titans {command}: error: {e}", file=sys.stderr)
        return 2
    if report["status"] == "submitted":
        runner = report["runner"].rsplit(".", 1)[-1].removesuffix("Runner") or report["runner"]
        print(f"titans {command}: {runner} job {report['job_id']} submitted; not waiting for it"
              if report["job_id"] else
              f"titans {command}: job graph handed to {runner} (a template launch); not waiting")
        print(f"the job writes labels/, dead_letter/, {REPORT} and then _SUCCESS under "
              f"{config.output}")
        return 0
    print(summary(report))
    print(f"labels: {storage.join(config.output, 'labels')}/  report: "
          f"{storage.join(config.output, REPORT)}")
    return 0 if report["status"] == "complete" else 1
