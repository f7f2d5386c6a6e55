"""Running a planned job, with the output protocol a labeling job promises.

1. Everything that can fail before the data is touched is checked first: the pipeline
   options and runner (building a pipeline object) and the models' devices (where the
   workers run on this machine: ``check_devices``, one check for every command), the output
   lock (``output_lock``: one job per output; a second one is refused, naming the first),
   the plan's launch checks (input, models), then a write probe into the output directory.
2. ``--overwrite`` deletes nothing here: the job replaces the previous run's outputs at its
   end (``pipeline/overwrite.py``), so a job that fails before then (a GPU quota, a runner
   error, a kill) leaves the previous complete output readable.
3. The pipeline writes its files through temp-file-and-rename, then report.json, then
   ``_SUCCESS`` last (see ``stages.finish``), each once: the job's last step knows everything
   the report says -- the launcher hands it the runner's name and its own phases up to
   ``p.run()`` (``stages.JobRecord``), and the counts, the models' rows and forward calls and
   the first read reach it as count pairs -- so nothing rewrites the report after the job, on
   any runner, whether the launcher waits or not. Without ``_SUCCESS`` an output is incomplete
   (a killed run) or failed (over the dead-letter budget).
4. A job that fails fails on the runner: over the dead-letter budget its last step writes the
   report and then raises (``failures.JobFailed``); an infrastructure error the runner's
   retries did not get past ends it too. ``run_job`` returns the failed report for the first
   (the command prints it, exit 1) and raises ``failures.JobError`` (one line, exit 1) for
   the second.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
import uuid
from typing import Callable, Iterator

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from titans.transforms.io import storage
from titans.pipeline import output_lock
from titans.pipeline.cli import startup
from titans.pipeline.failures import JobError, failed_report_path, one_line
from titans.pipeline.options import check_accelerators, pipeline_options  # shared with describe
from titans.pipeline.phases import Phases
from titans.pipeline.graphs.stages import JobRecord, Launch
from titans.pipeline.outputs import REPORT, SUCCESS
from titans.pipeline.overwrite import FAILED_REPORT

_LOG = logging.getLogger("titans")

# build(pipeline, plan, Launch or the command's start): see stages.finish
Build = Callable[[beam.Pipeline, object, "Launch | float"], None]

# figures of a larger job that the next job run_job starts is the last part of (whole_job)
_WHOLE_JOB: contextvars.ContextVar = contextvars.ContextVar("titans_whole_job", default=None)

# runners whose workers run on this machine (Beam's in-process runners and Prism), by their
# name without a "Runner" suffix: the models' devices are checked here only for these
LOCAL_RUNNERS = ("direct", "fnapi", "switchingdirect", "bundlebaseddirect", "prism")


def runs_here(options: PipelineOptions) -> bool:
    """Whether the runner runs the job's workers on this machine (not Dataflow, not a cluster)."""
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) else type(runner).__name__
    name = name.rsplit(".", 1)[-1].lower()
    return name.removesuffix("runner") in LOCAL_RUNNERS


def device_problem(device: str) -> str | None:
    """Why ``device`` (a --ROLE-device value) cannot run a model on this machine, or None."""
    import torch

    d = device.lower()
    if d in ("cpu", "auto"):
        return None
    if d == "gpu":
        d = "cuda"
    try:
        parsed = torch.device(d)
    except RuntimeError:
        return "not a device; use cpu, cuda, cuda:N or auto"
    if parsed.type != "cuda":
        return None
    if not torch.cuda.is_available():
        build = ("a CPU-only build of torch" if torch.version.cuda is None else
                 f"torch built for CUDA {torch.version.cuda}, but no device is visible")
        return f"no CUDA device on this machine ({build} {torch.__version__})"
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def check_devices(options: PipelineOptions, models: dict) -> None:
    """Every command's device check, before anything is deleted: ``models`` maps a role
    (teacher, student) to its ModelRef. Checked only where the models will run, i.e. when
    the runner's workers are on this machine: a Dataflow launcher has no GPU, its workers do."""
    if not runs_here(options):
        return
    for role, ref in models.items():
        problem = device_problem(ref.device)
        if problem:
            raise ValueError(f"--{role}-device {ref.device}: {problem}; pass --{role}-device cpu "
                             f"or auto, or run on workers that have a GPU (e.g. Dataflow with an "
                             f"accelerator)")


def checked_pipeline(beam_args: list[str], models: dict, hints: dict | None = None
                     ) -> tuple[beam.Pipeline, PipelineOptions]:
    """A pipeline for ``beam_args``, after the launch checks that need no data: the options
    and runner (an unknown runner fails when the pipeline is built) and the devices of
    ``models``, and on Dataflow that a GPU asked for (the teacher's ``hints``, a
    worker_accelerator) fits its machine type. Nothing is written."""
    options = pipeline_options(beam_args)
    # before the runner is built: DataflowRunner's own checks reach for Cloud Storage
    check_accelerators(options, (hints or {}).get("accelerator"))
    try:
        p = beam.Pipeline(options=options)
    except ValueError as e:
        raise ValueError(f"pipeline options: {e}") from e
    check_devices(options, models)
    return p, options


def job_checks(beam_args: list[str], models: dict, hints: dict | None = None) -> PipelineOptions:
    """``checked_pipeline``'s checks alone, for a command that builds its pipelines later
    (`titans label`, `titans demo`): the pipeline is dropped."""
    return checked_pipeline(beam_args, models, hints)[1]


def models_of(config) -> dict:
    """{role: ModelRef} of a RunConfig or TeacherLabelConfig."""
    student = getattr(config, "student", None)
    return {"teacher": config.teacher, **({"student": student} if student is not None else {})}


def prepare_output(output: str, overwrite: bool = False) -> None:
    """Probe that ``output`` is writable. Nothing is deleted: with ``overwrite`` the job
    replaces the previous run's outputs at its end (``pipeline/overwrite.py``)."""
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
    if overwrite and storage.exists(storage.join(output, SUCCESS)):
        _LOG.info("--overwrite: the previous run's outputs in %s stay until this job's last "
                  "step replaces them", output)


@contextlib.contextmanager
def whole_job(extend: Callable[[dict, float], None]) -> Iterator[None]:
    """The job run_job starts in this block is the last part of a larger one (`titans label`'s
    cascade): its final step calls ``extend(report, now)`` before it writes report.json, so
    the larger job's figures are in the report the job writes, once. ``extend`` travels with
    the job (it is pickled for a remote runner)."""
    token = _WHOLE_JOB.set(extend)
    try:
        yield
    finally:
        _WHOLE_JOB.reset(token)


def run_job(plan, build: Build, beam_args: list[str], start: float | None = None,
            wait: bool = True, phases: Phases | None = None,
            lock: output_lock.Lock | None = None) -> dict:
    """Run a planned job to the end and return its report; ``start``: when the command began.

    The job writes report.json and ``_SUCCESS`` itself, once, when it is done (see
    ``stages.finish``): this launcher hands its last step what it knows before the job runs
    (the runner's name, the phases marked up to ``p.run()``), so the report is the same on
    every runner. ``wait=False``: return as soon as the runner has the job (a Dataflow job
    submitted, or its graph written for a Flex Template launch) with ``{"status":
    "submitted", ...}``. A Flex Template's launcher must not wait for its job.

    ``lock``: the output lock the caller holds (``launch`` and `titans label` take it before
    their checks; label's covers its phases' jobs too); without one, run_job takes the lock of
    the output and releases it when the job ends, however it ends. Every check comes before
    anything in the output is deleted: runner and options, devices, the lock, the graph, the
    write probe. With ``wait=False`` the lock is handed to the job, whose last step releases it."""
    start = time.time() if start is None else start
    phases = Phases(start) if phases is None else phases
    p, options = checked_pipeline(beam_args, models_of(plan.config),  # before any deletion
                                  plan.config.teacher_resource_hints)
    output = plan.config.output
    own = lock is None
    if own:
        lock = output_lock.acquire(output, _command(plan), plan.config.overwrite)
    try:
        if not wait:
            output_lock.hand_to_job(p, lock)  # before the build: the Finish step takes it along
        launch = Launch(phases.start)
        build(p, plan, launch)  # every step but Finish, which is applied below
        prepare_output(output, plan.config.overwrite)
        phases.mark("pipeline_construction")
        launch.finish(JobRecord(start=phases.start, runner=runner_name(options),
                                phase_seconds=tuple(phases.seconds.items()),
                                launched_at=phases.last, whole_job=_WHOLE_JOB.get(),
                                replace=plan.config.overwrite, run=uuid.uuid4().hex[:12]))
        startup.resume_gc()  # if the command line paused it for start-up
        try:
            result = p.run()
            if not wait:
                lock.handed_over()  # the job's last step releases it; this process must not
                return submitted(result, options, output)
            result.wait_until_finish()
        except Exception as e:  # noqa: BLE001 - the runner gave up on the job: why, in one line
            return failed_report(e)
        report = storage.read_json(storage.join(output, REPORT))  # as the job wrote it
        if report.get("phase_seconds"):
            _LOG.info("where the time went: %s", Phases.resume(
                phases.start, report["phase_seconds"], phases.start).line())
        return report
    finally:
        if own:
            lock.release()


def failed_report(error: Exception) -> dict:
    """The report of a job that ``error`` ended: the failed report its last step wrote and
    named (over the dead-letter budget), with ``report_path`` added; JobError otherwise."""
    path = failed_report_path(error)
    if path is None:
        raise JobError(one_line(error)) from error
    try:
        report = storage.read_json(path)
    except Exception as e:  # noqa: BLE001 - named but unreadable: say both
        raise JobError(f"{one_line(error)} (its report {path} cannot be read: {e})") from error
    return {**report, "report_path": path}


def runner_name(options: PipelineOptions) -> str:
    """The runner as the report names it (--runner's value, or the runner object's)."""
    return str(options.view_as(StandardOptions).runner)


def _command(plan) -> str:
    return "run" if hasattr(plan.config, "student") else "teacher-label"


def submitted(result, options: PipelineOptions, output: str) -> dict:
    """What run_job(wait=False) returns: the job is the runner's now."""
    job_id = None
    if getattr(result, "has_job", False):  # DataflowPipelineResult; None for a template launch
        job_id = result.job_id()
    return {"status": "submitted", "job_id": job_id,
            "runner": runner_name(options),
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


def run_cascade(plan, beam_args: list[str], start: float | None = None,
                wait: bool = True, phases: Phases | None = None,
                lock: output_lock.Lock | None = None) -> dict:
    from titans.pipeline.graphs.cascade import build_pipeline

    return run_job(plan, build_pipeline, beam_args, start, wait, phases, lock)


def run_teacher_label(plan, beam_args: list[str], start: float | None = None,
                      wait: bool = True, phases: Phases | None = None,
                      lock: output_lock.Lock | None = None) -> dict:
    from titans.pipeline.graphs.teacher_label import build_pipeline

    return run_job(plan, build_pipeline, beam_args, start, wait, phases, lock)


def launch(config, beam_args: list[str], start: float | None = None, *,
           describe: bool = False, wait: bool = True) -> int:
    """Plan, run and summarise a `titans run` (RunConfig) or `titans teacher-label`
    (TeacherLabelConfig) job; the command's exit code: 0 done (or nothing to label under
    --skip-labeled), 1 the job failed its dead-letter budget (report written, no _SUCCESS); a
    launch check that fails raises ValueError (the caller prints it, exit 2), a job the runner
    gave up on raises JobError (the caller prints its line, exit 1). ``describe``: plan and build, print the pipeline as JSON, run
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
        if describe:
            from titans.pipeline.graphs import cascade as cascade_pipeline
            from titans.pipeline.graphs import teacher_label
            from titans.pipeline.describe import describe_job, to_json

            plan = plan_run(config, phases) if cascade else plan_teacher_label(config, phases)
            build = (cascade_pipeline if cascade else teacher_label).build_pipeline
            print(to_json(describe_job(plan, build, beam_args, command)))
            return 0
        # runner, options, devices, GPU/machine pair: seconds earlier
        job_checks(beam_args, models_of(config), config.teacher_resource_hints)
        # the lock before the plan's checks: a second run into this output is refused at once,
        # naming the first; released however this ends, unless handed to a job not waited for
        with output_lock.acquire(config.output, command, config.overwrite) as lock:
            plan = plan_run(config, phases) if cascade else plan_teacher_label(config, phases)
            report = (run_cascade if cascade else run_teacher_label)(plan, beam_args, start,
                                                                     wait, phases, lock)
    except NothingToLabel as e:  # --skip-labeled: every input file is labeled already
        print(f"titans {command}: {e}")
        if not wait:
            submit_nothing(beam_args, f"titans {command}: {e}")
        return 0
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
          f"{report.get('report_path') or storage.join(config.output, REPORT)}")
    if report.get("report_path", "").endswith(FAILED_REPORT):
        print(f"the previous complete output in {config.output} is kept as it was")
    return 0 if report["status"] == "complete" else 1
