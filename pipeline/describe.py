"""`titans run --describe` and `titans teacher-label --describe`: the job as it would run.

The launch checks run (files, schema, both models on sampled rows, the threshold), the
pipeline is built with the given Beam options, and what a runner would receive is printed as
JSON: the stages in order, read from the pipeline proto (the graph Dataflow gets), each with
the resource hints of its environments, the model stages with their model, batch size and
device, and the resolved plan. Nothing runs, nothing is written or deleted (the output
directory is not prepared), and nothing needs the network beyond reading the input and the
models (Beam's own checks of a Dataflow job's options, which call Cloud Storage, are left to
the real launch).
"""
from __future__ import annotations

import json
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.runner import PipelineRunner

from titans.pipeline.options import pipeline_options

# the model stages of the pipelines (see cascade.py, teacher_label.py), by transform name
MODEL_STAGES = {"ScoreStudent": "student", "ScoreTeacher": "teacher"}


class _BuildOnly(PipelineRunner):
    """The runner a described pipeline is built with: it never runs or submits anything.
    Beam validates a Dataflow job's options (temp and staging buckets) over the network when
    the pipeline is created with DataflowRunner; that is left to the real launch. The graph
    is the same (resource hints, environments and fusion breaks come from the transforms and
    the options, not from the runner object)."""

    def run_pipeline(self, pipeline, options):
        raise RuntimeError("a described pipeline is built, never run")


def describe_job(plan, build, beam_args: list[str], command: str) -> dict:
    options = pipeline_options(beam_args)
    try:
        p = beam.Pipeline(runner=_BuildOnly(), options=options)
    except ValueError as e:
        raise ValueError(f"pipeline options: {e}") from e
    build(p, plan, time.time())
    proto = p.to_runner_api()
    return {"command": f"titans {command}",
            "runner": str(options.view_as(StandardOptions).runner),
            "stages": stages(proto, plan),
            "plan": {**plan.facts(), "rows": plan.input.source.num_rows,
                     "skip_labeled": plan.config.skip_labeled}}


def stages(proto, plan) -> list[dict]:
    """The pipeline's top-level transforms in the order they were applied, each with the
    union of the resource hints of the environments its steps run in."""
    transforms = proto.components.transforms
    envs = proto.components.environments
    out = []
    for root_id in proto.root_transform_ids:
        root = transforms[root_id]
        for tid in root.subtransforms or [root_id]:
            t = transforms[tid]
            hints: dict = {}
            for leaf in _leaves(transforms, tid):
                env_id = transforms[leaf].environment_id
                if env_id in envs:
                    env = envs[env_id]
                    hints.update({_hint_name(urn): _hint_value(v)
                                  for urn, v in env.resource_hints.items()})
            stage = {"name": t.unique_name, "resource_hints": dict(sorted(hints.items()))}
            role = MODEL_STAGES.get(t.unique_name)
            if role:
                stage.update(_model_stage(plan.config, role))
            out.append(stage)
    return out


def _leaves(transforms, tid: str):
    """Ids of the primitive transforms below ``tid`` (itself, if it is one)."""
    stack = [tid]
    while stack:
        current = stack.pop()
        children = transforms[current].subtransforms
        if children:
            stack.extend(children)
        else:
            yield current


def _model_stage(config, role: str) -> dict:
    ref = getattr(config, role)
    batch = config.batch_size if role == "student" else config.teacher_batch_size
    return {"model": ref.path, "batch_size": batch, "device": ref.device}


def _hint_name(urn: str) -> str:
    # beam:resources:accelerator:v1 -> accelerator, beam:resources:min_ram_bytes:v1 -> min_ram_bytes
    parts = urn.split(":")
    return parts[2] if len(parts) >= 4 and parts[:2] == ["beam", "resources"] else urn


def _hint_value(value: bytes):
    text = value.decode("utf-8", errors="replace")
    return int(text) if text.isdigit() else text


def to_json(description: dict) -> str:
    return json.dumps(description, indent=2, default=str)
