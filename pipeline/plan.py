"""Everything checked before a pipeline starts, and the decisions made from it.

A wrong path, a missing column, a model that does not load or does not fit the
features all fail here, on the launcher, with a message saying what to fix, instead
of minutes into a distributed job.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import pyarrow as pa
import torch
from apache_beam.io.filesystems import FileSystems

from titans.models.calibration import load_calibration
from titans.models.deferral import DeferralRule, make_rule, threshold_for_rate
from titans.models.loading import ModelLoadError, count_parameters
from titans.pipeline import defaults
from titans.transforms.features import (FeatureSpec, as_tensor, feature_matrix,
                                        resolve_feature_spec)
from titans.models.loading import ModelRef
from titans.transforms.labels import LabelColumns
from titans.transforms.parquet_io import input_pattern, match_files, read_schema, sample_rows

_LOG = logging.getLogger("titans")

# what a run writes into its output directory; --overwrite removes exactly these
OUTPUTS = ("labels", "dead_letter", "report.json", "report.png")


@dataclasses.dataclass
class RunConfig:
    """What a user asked for. ``student=None`` means `titans teacher-label`: the teacher on
    every row, writing its probabilities."""
    input: str
    output: str
    student: ModelRef | None
    teacher: ModelRef
    feature_columns: tuple[str, ...] = ("features",)
    id_column: str | None = None
    rule: str | None = None  # default margin, or the calibration file's
    threshold: float | None = None
    deferral_rate: float | None = None  # used when no threshold is given; default 0.2
    calibration: str | None = None  # CAL.json from `titans calibrate`: rule and threshold
    deferral_model: str | None = None
    audit_rate: float = 0.0
    batch_size: int = defaults.BATCH_SIZE
    teacher_batch_size: int = defaults.TEACHER_BATCH_SIZE
    column_prefix: str = ""
    overwrite: bool = False
    sample_rows: int = defaults.SAMPLE_ROWS
    max_dead_letter_rate: float = defaults.MAX_DEAD_LETTER_RATE
    seed: int = 0
    teacher_resource_hints: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Plan:
    config: RunConfig
    pattern: str
    files: list[str]
    input_schema: pa.Schema
    features: FeatureSpec
    columns: LabelColumns
    output_schema: pa.Schema
    num_classes: int
    teacher_parameters: int
    student_parameters: int = 0
    rule: DeferralRule | None = None
    threshold: float | None = None
    threshold_source: str = ""

    @property
    def teacher_only(self) -> bool:
        return self.config.student is None

    def facts(self) -> dict:
        """Static facts of the run, for the report."""
        c = self.config
        facts = {
            "input": c.input, "input_files": len(self.files), "output": c.output,
            "feature_columns": list(self.features.columns), "feature_dim": self.features.dim,
            "num_classes": self.num_classes, "teacher": c.teacher.path,
            "teacher_parameters": self.teacher_parameters,
            "batch_size": c.batch_size, "teacher_batch_size": c.teacher_batch_size,
        }
        if self.teacher_only:
            return {"mode": "teacher-label (teacher on every row)", **facts}
        return {
            "mode": "cascade", "rule": self.rule.name, "threshold": json_float(self.threshold),
            "threshold_source": self.threshold_source,
            "requested_deferral_rate": c.deferral_rate if self.threshold_source.startswith(
                "quantile") else None,
            "calibration": c.calibration, "audit_rate": c.audit_rate,
            "student": c.student.path, "student_parameters": self.student_parameters, **facts,
        }


def json_float(x: float):
    """JSON has no infinities: -inf (defer everything) is written as the string '-inf'."""
    return x if math.isfinite(x) else str(x)


def plan_run(config: RunConfig) -> Plan:
    _check_config(config)
    prepare_output(config.output, config.overwrite, clear=False)  # fail early, delete last
    pattern = input_pattern(config.input)
    files = match_files(pattern)
    schema = read_schema(files[0])
    if config.id_column and config.id_column not in schema.names:
        raise ValueError(f"--id-column {config.id_column!r} is not in the input; its columns are "
                         f"{schema.names}")
    sample = sample_rows(files, config.sample_rows, config.seed, schema)
    features = resolve_feature_spec(schema, tuple(config.feature_columns),
                                    first_vector_length(sample, config.feature_columns))
    x, reasons = feature_matrix(sample, features)
    if reasons is not None:
        x = x[np.array([r is None for r in reasons])]
    if len(x) == 0:
        raise ValueError(f"none of the {sample.num_rows} sampled rows has valid features in "
                         f"{list(features.columns)}; check --feature-columns")
    columns = LabelColumns(config.column_prefix)
    teacher = load_checked("teacher", config.teacher, features.dim)
    teacher_classes = _outputs(teacher, x[:4]).shape[-1]
    if config.student is None:
        prepare_output(config.output, config.overwrite)
        return Plan(config, pattern, files, schema, features, columns,
                    columns.output_schema(schema, columns.teacher_fields(teacher_classes)),
                    teacher_classes, count_parameters(teacher))

    _apply_calibration(config)
    rule = make_rule(config.rule or "margin", config.deferral_model)
    student = load_checked("student", config.student, features.dim)
    student_logits = _outputs(student, x)
    num_classes = student_logits.shape[-1] - rule.extra_outputs
    if num_classes != teacher_classes:
        extra = f" (+{rule.extra_outputs} for rule {rule.name})" if rule.extra_outputs else ""
        raise ValueError(f"student has {student_logits.shape[-1]} outputs{extra} but the teacher "
                         f"has {teacher_classes}: they must agree on the number of classes")
    if config.threshold is not None:
        threshold = float(config.threshold)
        source = (f"calibration file {config.calibration}" if config.calibration
                  else "given (--threshold)")
    else:
        rate = 0.2 if config.deferral_rate is None else config.deferral_rate
        config.deferral_rate = rate
        _, scores = rule(student_logits)
        threshold = threshold_for_rate(scores.numpy(), rate)
        source = (f"quantile {1 - rate:g} of student scores on a sample of {len(x):,} rows "
                  f"(seed {config.seed})")
    _LOG.info("rule %s, threshold %s: %s", rule.name, threshold, source)
    prepare_output(config.output, config.overwrite)
    return Plan(config, pattern, files, schema, features, columns,
                columns.output_schema(schema, columns.cascade_fields()), num_classes,
                count_parameters(teacher), count_parameters(student), rule, threshold, source)


def _apply_calibration(config: RunConfig) -> None:
    """Take rule, threshold (and learned deferral model) from a `titans calibrate` file."""
    if not config.calibration:
        return
    given = [flag for flag, value in (("--threshold", config.threshold),
                                      ("--deferral-rate", config.deferral_rate),
                                      ("--rule", config.rule),
                                      ("--deferral-model", config.deferral_model)) if value is not None]
    if given:
        raise ValueError(f"--calibration sets the rule and threshold; drop {', '.join(given)}")
    try:
        cal = load_calibration(config.calibration)
    except (OSError, ValueError) as e:
        raise ValueError(f"--calibration {config.calibration!r}: {e}") from e
    config.rule, config.threshold = cal["rule"], float(cal["threshold"])
    config.deferral_model = cal.get("deferral_model")


def _outputs(model: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    try:
        with torch.inference_mode():
            return model(as_tensor(x)).float()
    except Exception as e:  # noqa: BLE001 - a model that fails on real rows
        raise ValueError(f"a model failed on rows sampled from the input: {type(e).__name__}: "
                         f"{e}") from e


def _check_config(c: RunConfig) -> None:
    if c.threshold is not None and c.deferral_rate is not None:
        raise ValueError("pass either --threshold or --deferral-rate, not both")
    if c.deferral_rate is not None and not 0.0 <= c.deferral_rate <= 1.0:
        raise ValueError(f"--deferral-rate must be between 0 and 1, got {c.deferral_rate}")
    if not 0.0 <= c.audit_rate <= 1.0:
        raise ValueError(f"--audit-rate must be between 0 and 1, got {c.audit_rate}")
    for name in ("batch_size", "teacher_batch_size", "sample_rows"):
        if getattr(c, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def prepare_output(output: str, overwrite: bool, clear: bool = True) -> None:
    """Refuse a non-empty output directory unless ``overwrite``; with ``clear``, remove a
    previous run's outputs (only those: other files in the directory are left alone)."""
    existing = FileSystems.match([FileSystems.join(output, "*")])[0].metadata_list
    if not existing:
        return
    if not overwrite:
        raise ValueError(f"output directory {output!r} is not empty; choose another --output or "
                         f"pass --overwrite to replace a previous run's {', '.join(OUTPUTS)}")
    for name in OUTPUTS if clear else ():
        path = FileSystems.join(output, name)
        if FileSystems.exists(path):
            FileSystems.delete([path])


def load_checked(role: str, ref: ModelRef, dim: int) -> torch.nn.Module:
    try:
        model = ref.load("cpu")
    except (ModelLoadError, json.JSONDecodeError) as e:
        raise ValueError(f"--{role}: {e}") from e
    try:
        with torch.inference_mode():
            out = model(torch.zeros((2, dim)))
    except Exception as e:  # noqa: BLE001 - any failure here is a shape/contract problem
        raise ValueError(f"--{role} {ref.path!r} does not accept a float32 [batch, {dim}] input "
                         f"(the width of --feature-columns): {type(e).__name__}: {e}") from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"--{role} {ref.path!r} must return logits [batch, classes]; for a "
                         f"[2, {dim}] input it returned {shape}")
    return model


def first_vector_length(sample: pa.Table, columns) -> int | None:
    if len(columns) != 1 or columns[0] not in sample.column_names:
        return None
    col = sample.column(columns[0])
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        return None
    for v in col.drop_null().slice(0, 1).to_pylist():
        return len(v)
    return None
