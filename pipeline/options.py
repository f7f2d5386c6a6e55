"""Beam's PipelineOptions for a titans job, in one place for the commands that build them,
and the launch check that a GPU asked of Dataflow comes with a machine type that can carry it.

Its own module so that ``job`` (which runs a job) and ``describe`` (which writes a job's
graph without running it, and which ``job`` calls) both import it, one way.
"""
from __future__ import annotations

from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                  StandardOptions, WorkerOptions)

from titans.pipeline import defaults

# Compute Engine attaches each GPU type to one machine series only; Dataflow asks Compute
# Engine for the pair as given and the job fails after minutes of start-up when it does not
# fit, so the pair is checked before anything starts. GPU type -> (series prefix, example).
GPU_MACHINES = {
    "nvidia-l4": ("g2-", "g2-standard-4"),
    "nvidia-l4-vws": ("g2-", "g2-standard-4"),
    "nvidia-tesla-t4": ("n1-", "n1-standard-4"),
    "nvidia-tesla-t4-vws": ("n1-", "n1-standard-4"),
    "nvidia-tesla-v100": ("n1-", "n1-standard-8"),
    "nvidia-tesla-p100": ("n1-", "n1-standard-8"),
    "nvidia-tesla-p100-vws": ("n1-", "n1-standard-8"),
    "nvidia-tesla-p4": ("n1-", "n1-standard-4"),
    "nvidia-tesla-p4-vws": ("n1-", "n1-standard-4"),
    "nvidia-tesla-a100": ("a2-", "a2-highgpu-1g"),
    "nvidia-a100-80gb": ("a2-", "a2-ultragpu-1g"),
    "nvidia-h100-80gb": ("a3-", "a3-highgpu-1g"),
    "nvidia-h100-mega-80gb": ("a3-", "a3-megagpu-8g"),
}
# what Dataflow starts for a batch job without --machine_type
DATAFLOW_DEFAULT_MACHINE = "n1-standard-1"


# titans' fix of Beam 2.77's Dask runner (pipeline/dask_runner.py; docs/runners.md says why):
# named by its path, so that only a job that asks for Dask imports dask
DASK_RUNNER = "titans.pipeline.dask_runner.DaskRunner"


def is_beam_dask(runner) -> bool:
    """Whether --runner names Beam's Dask runner: DaskRunner, Dask, or its module path."""
    name = runner.rsplit(".", 1)[-1].lower() if isinstance(runner, str) else ""
    return name.removesuffix("runner") == "dask" and runner != DASK_RUNNER


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        # not "DirectRunner": its checks before it picks this same runner (two passes over
        # the graph, importing Pub/Sub) cost ~0.15 s a run
        standard.runner = defaults.RUNNER
    elif is_beam_dask(standard.runner):
        import importlib.util

        if importlib.util.find_spec("distributed") is None:
            raise ValueError(f"--runner {standard.runner} needs dask and distributed: pip "
                             f"install 'apache-beam[dask]==2.77.*'")
        # Beam's own mixes a ParDo's tagged outputs and drops finish_bundle's outputs
        standard.runner = DASK_RUNNER
    return options


def hint_fields(hint: str) -> dict:
    """'type:nvidia-l4;count:1;machine_type:g2-standard-4;install-nvidia-driver' ->
    {'type': 'nvidia-l4', 'count': '1', 'machine_type': 'g2-standard-4',
    'install-nvidia-driver': ''} (Dataflow's accelerator format)."""
    fields = {}
    for part in hint.split(";"):
        key, _, value = part.strip().partition(":")
        if key:
            fields[key] = value
    return fields


def series(machine_type: str) -> str:
    """'g2-standard-4' -> 'g2-'; a custom machine without a series ('custom-4-16384') is N1."""
    machine = machine_type.strip().lower()
    return "n1-" if machine.startswith("custom-") else machine.split("-", 1)[0] + "-"


def gpu_machine_problem(gpu: str, machine_type: str) -> str | None:
    """Why ``machine_type`` cannot carry a GPU of type ``gpu``, or None (also for a GPU type
    this table does not know: Dataflow then decides)."""
    fit = GPU_MACHINES.get(gpu.strip().lower())
    if fit is None or series(machine_type) == fit[0]:
        return None
    return (f"a {gpu} GPU needs a {fit[0]}* machine type (e.g. {fit[1]}), not {machine_type}")


def is_dataflow(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) else type(runner).__name__
    return "dataflow" in name.rsplit(".", 1)[-1].lower()


def check_accelerators(options: PipelineOptions, teacher_accelerator: str | None) -> None:
    """On Dataflow, refuse a GPU on a machine type that cannot carry it, in one line naming
    the fix: the teacher's accelerator hint (its own machine_type, else the job's
    --machine_type, else Dataflow's default) and a worker_accelerator service option (the
    job's --machine_type, else the default). Local runners ignore both, so nothing is checked
    there."""
    if not is_dataflow(options):
        return
    job_machine = options.view_as(WorkerOptions).machine_type
    if teacher_accelerator:
        fields = hint_fields(teacher_accelerator)
        machine = fields.get("machine_type") or job_machine or DATAFLOW_DEFAULT_MACHINE
        problem = gpu_machine_problem(fields.get("type", ""), machine)
        if problem:
            example = GPU_MACHINES[fields["type"].strip().lower()][1]
            raise ValueError(f"--teacher-accelerator {teacher_accelerator!r}: {problem}; put "
                             f"machine_type:{example} in the hint")
    for option in options.view_as(GoogleCloudOptions).dataflow_service_options or []:
        name, _, value = option.partition("=")
        if name.strip() != "worker_accelerator":
            continue
        gpu = hint_fields(value).get("type", "")
        problem = gpu_machine_problem(gpu, job_machine or DATAFLOW_DEFAULT_MACHINE)
        if problem:
            example = GPU_MACHINES[gpu.strip().lower()][1]
            raise ValueError(f"--dataflow_service_options {option!r}: {problem}; pass "
                             f"--machine_type {example}")
