"""Everything checked before a pipeline starts, and the decisions made from it.

A wrong path, an unreadable file, a missing column, a model that does not load or does not
fit the features all fail here, on the launcher, with a message saying what to fix, instead
of minutes into a distributed job. Nothing is written or deleted here: the output directory
is only checked (see ``titans.pipeline.job`` for when it is cleared).

A config (what the user asked for) is never changed; every decision taken from it and from
the data (the unified input schema, the rule, the threshold and where it came from) is on
the plan.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import math
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from titans.transforms.io import storage
from titans.models.deferral import DeferralRule, make_rule, threshold_for_rate
from titans.models.loading import ModelRef, count_parameters
from titans.transforms.io.models import load_calibration, load_learned_deferral
from titans.pipeline import defaults
from titans.pipeline.model_checks import Tally, check_on_sample, load_checked
from titans.pipeline.output_lock import is_lock
from titans.pipeline.phases import Phases, mark
from titans.transforms.features import (FeatureSpec, ImageSpec, TokenSpec, feature_matrix,
                                        resolve_features)
from titans.transforms.io.inputs import AUTO, PARQUET, list_input, load_input
from titans.transforms.labels import LabelColumns

_LOG = logging.getLogger("titans")

TEACHER_CHECK_ROWS = 256  # sampled rows the teacher is tried on at launch (it is the costly one)
# Images: the launch sample when --sample-rows is left at its default: IMAGE_SAMPLE_SHARE of
# the input's rows, at least IMAGE_SAMPLE_MIN and at most IMAGE_SAMPLE_ROWS. Each sampled
# image is decoded and scored at launch, work the cascade does again, so a 100,000-row sample
# cost as much as a 100,000-image job. A 0.9 quantile from 10,000 rows defers 10% +- 0.6%
# (95%), from 1,000 rows 10% +- 1.9%.
IMAGE_SAMPLE_ROWS, IMAGE_SAMPLE_SHARE, IMAGE_SAMPLE_MIN = 10_000, 0.1, 1_000


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobConfig:
    """What a user asked for, shared by `titans run` and `titans teacher-label`."""
    input: str
    output: str
    teacher: ModelRef
    input_format: str = AUTO  # or "parquet", "tfrecord"
    output_format: str = PARQUET  # labels/ as "parquet" or "tfrecord" (tf.train.Example)
    feature_columns: tuple[str, ...] = ("features",)
    image: ImageSpec | None = None  # features from encoded images instead of feature_columns
    tokens: TokenSpec | None = None  # features from token-id sequences instead
    id_column: str | None = None
    batch_size: int = defaults.BATCH_SIZE
    teacher_batch_size: int = defaults.TEACHER_BATCH_SIZE
    column_prefix: str = ""
    overwrite: bool = False
    sample_rows: int = defaults.SAMPLE_ROWS
    seed: int = 0
    teacher_resource_hints: dict = dataclasses.field(default_factory=dict)
    max_dead_letter_rate: float = defaults.MAX_DEAD_LETTER_RATE
    max_record_bytes: int = defaults.MAX_RECORD_BYTES  # TFRecord: larger records are damage
    # rows this job leaves out, {path: ((first row, end row), ...)}: `titans label` labels its
    # sample rows with the teacher itself and runs the cascade on the others
    skip_rows: dict = dataclasses.field(default_factory=dict)
    # --skip-labeled: a manifest of input files finished runs labeled (pipeline/manifest.py);
    # files listed with the same size and time are left out, and a completed job adds its own
    skip_labeled: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig(JobConfig):
    """`titans run`: the cascade."""
    student: ModelRef
    rule: str | None = None  # default defaults.RULE, or the calibration file's
    threshold: float | None = None
    deferral_rate: float | None = None  # used when no threshold is given; default defaults.DEFERRAL_RATE
    calibration: str | None = None  # CAL.json from `titans calibrate`: rule and threshold
    deferral_model: str | None = None
    audit_rate: float = 0.0
    # Parquet rows labeled before this job, already in its output schema (`titans label`'s
    # sample rows, source 'teacher'): written into labels/ as they are and counted in the report
    prelabeled: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherLabelConfig(JobConfig):
    """`titans teacher-label`: the teacher on every row, writing its probabilities."""


class ThresholdSource(enum.Enum):
    GIVEN = "given (--threshold)"
    CALIBRATION = "calibration file"
    SAMPLE_QUANTILE = "quantile of student scores on a sample of the input"
    RATE_BOUND = "deferral rate 0 or 1 (exact, no sample needed)"


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """The input as checked at launch: files, unified schema, features, added columns."""
    source: object  # a ParquetInput or a TFRecordInput (titans.transforms.io.inputs)
    features: FeatureSpec
    columns: LabelColumns
    output_schema: pa.Schema

    @property
    def input_names(self) -> list[str]:
        return self.source.schema.names

    def batch_rows(self, requested: int) -> int:
        """Rows per batch for a requested batch size: for images fewer, so that a decoded
        batch stays under features.IMAGE_BATCH_BYTES whatever the image size."""
        return self.features.batch_rows(requested)

    def facts(self, config: JobConfig) -> dict:
        capped = {} if not isinstance(self.features, ImageSpec) else {
            "image_batch_rows": self.batch_rows(config.batch_size),
            "image_teacher_batch_rows": self.batch_rows(config.teacher_batch_size)}
        return {**capped, "input": config.input, "input_format": self.source.format,
                "input_files": len(self.source.files),
                "input_files_unreadable_into_schema": len(self.source.conflicts),
                "output": config.output, "output_format": config.output_format,
                "feature_columns": list(self.features.columns),
                "feature_dim": self.features.dim, "model_input": self.features.describe(),
                "batch_size": config.batch_size,
                "teacher_batch_size": config.teacher_batch_size,
                "max_dead_letter_rate": config.max_dead_letter_rate}


@dataclasses.dataclass(frozen=True)
class CascadePlan:
    config: RunConfig
    input: InputPlan
    num_classes: int
    teacher_parameters: int
    student_parameters: int
    rule: DeferralRule
    threshold: float
    threshold_source: ThresholdSource
    threshold_detail: str
    deferral_rate: float | None  # the rate asked for, when the threshold comes from it
    teacher_check_rows: int = 0  # rows the launch checks ran the teacher on

    def facts(self) -> dict:
        c = self.config
        return {
            "mode": "cascade", "rule": self.rule.name, "threshold": json_float(self.threshold),
            "rows_teacher_checks": self.teacher_check_rows,
            "threshold_source": f"{self.threshold_source.value}: {self.threshold_detail}",
            "requested_deferral_rate": self.deferral_rate, "calibration": c.calibration,
            "audit_rate": c.audit_rate, "student": c.student.path,
            "student_parameters": self.student_parameters, "teacher": c.teacher.path,
            "teacher_parameters": self.teacher_parameters, "num_classes": self.num_classes,
            **self.input.facts(c)}


@dataclasses.dataclass(frozen=True)
class TeacherLabelPlan:
    config: TeacherLabelConfig
    input: InputPlan
    num_classes: int
    teacher_parameters: int
    teacher_check_rows: int = 0  # rows the launch checks ran the teacher on

    def facts(self) -> dict:
        c = self.config
        return {"mode": "teacher-label", "rows_teacher_checks": self.teacher_check_rows,
                "teacher": c.teacher.path,
                "teacher_parameters": self.teacher_parameters, "num_classes": self.num_classes,
                **self.input.facts(c)}


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Parts of a plan a caller resolved before it (`titans label`'s launch plan): with them,
    ``plan_run`` and ``plan_teacher_label`` neither list the input, read its footers, sample
    it, resolve its features nor load and check the teacher again; everything else (the
    config's checks, rows to skip, the student, the threshold) goes the same way."""
    source: object          # a ParquetInput or TFRecordInput, as listed and read at launch
    sample: pa.Table        # rows sampled at launch
    features: object        # FeatureSpec, ImageSpec or TokenSpec, resolved on them
    x: np.ndarray           # the models' input for the sampled rows with usable features
    teacher_classes: int    # the teacher's outputs, checked on those rows
    teacher_parameters: int


def json_float(x: float):
    """JSON has no infinities: -inf (defer everything) is written as the string '-inf'."""
    return x if math.isfinite(x) else str(x)


def plan_run(config: RunConfig, phases: Phases | None = None,
             resolved: Resolved | None = None) -> CascadePlan:
    _check_job(config)
    _check_cascade(config)
    rule_name, threshold, deferral_model = config.rule, config.threshold, config.deferral_model
    if config.calibration:
        rule_name, threshold, deferral_model = _calibration(config)
    learned = None
    if rule_name == "learned" and deferral_model:  # make_rule takes the model, not its path
        learned = load_learned_deferral(deferral_model)
    rule = make_rule(rule_name or defaults.RULE, learned)
    source, sample, features = plan_source(config, phases, resolved)
    # the sample decoded and scored once, a batch at a time (a decoded image sample held
    # whole would be unbounded in the image size); the teacher tried on the first batch
    chunks = iter([resolved.x]) if resolved is not None else usable_chunks(sample, features)
    first = next(chunks)
    checks = Tally()  # the teacher's rows at launch, which report.json counts too
    if resolved is None:
        teacher_classes, teacher_parameters = check_teacher(config.teacher, features, first,
                                                            checks)
    else:
        teacher_classes, teacher_parameters = resolved.teacher_classes, resolved.teacher_parameters
    student = load_checked("student", config.student, features)
    student_logits = np.concatenate([check_on_sample("student", student, x)
                                     for x in itertools.chain([first], chunks)])
    mark(phases, "model_loading_and_checks")
    num_classes = student_logits.shape[-1] - rule.extra_outputs
    if num_classes != teacher_classes:
        extra = f" (+{rule.extra_outputs} for rule {rule.name})" if rule.extra_outputs else ""
        raise ValueError(f"student has {student_logits.shape[-1]} outputs{extra} but the teacher "
                         f"has {teacher_classes}: they must agree on the number of classes")
    rate = None
    if config.calibration:
        source_kind, detail = ThresholdSource.CALIBRATION, config.calibration
    elif threshold is not None:
        source_kind, detail = ThresholdSource.GIVEN, f"{threshold}"
    else:
        rate = defaults.DEFERRAL_RATE if config.deferral_rate is None else config.deferral_rate
        if rate in (0.0, 1.0):  # exact at any scale, unlike a sample's extreme quantile
            threshold, source_kind = (math.inf if rate == 0.0 else -math.inf), ThresholdSource.RATE_BOUND
            detail = f"rate {rate:g}"
        else:
            finite = student_logits[np.isfinite(student_logits).all(axis=1)]
            if len(finite) == 0:
                raise ValueError(
                    f"the student gave non-finite outputs (NaN or inf) on all "
                    f"{len(student_logits):,} sampled rows, so no threshold can be set from its "
                    f"scores; check the model (--student {config.student.path!r})")
            _, scores = rule(torch.from_numpy(finite))
            threshold = threshold_for_rate(scores.numpy(), rate)
            source_kind = ThresholdSource.SAMPLE_QUANTILE
            detail = f"the {1 - rate:g} quantile over {len(finite):,} rows (seed {config.seed})"
    _LOG.info("rule %s, threshold %s: %s: %s", rule.name, threshold, source_kind.value, detail)
    columns = LabelColumns(config.column_prefix)
    plan_input = InputPlan(source, features, columns,
                           columns.output_schema(source.schema, columns.cascade_fields()))
    return CascadePlan(config, plan_input, num_classes, teacher_parameters,
                       count_parameters(student), rule, float(threshold), source_kind, detail, rate,
                       checks.rows)


def plan_teacher_label(config: TeacherLabelConfig, phases: Phases | None = None,
                       resolved: Resolved | None = None) -> TeacherLabelPlan:
    _check_job(config)
    source, sample, features = plan_source(config, phases, resolved)
    checks = Tally()
    if resolved is None:
        # only the rows the teacher is tried on are decoded (images cost a decode each)
        classes, parameters = check_teacher(
            config.teacher, features, usable_rows(sample.slice(0, TEACHER_CHECK_ROWS), features),
            checks)
    else:
        classes, parameters = resolved.teacher_classes, resolved.teacher_parameters
    mark(phases, "model_loading_and_checks")
    columns = LabelColumns(config.column_prefix)
    plan_input = InputPlan(source, features, columns,
                           columns.output_schema(source.schema, columns.teacher_fields(classes)))
    return TeacherLabelPlan(config, plan_input, classes, parameters, checks.rows)


def check_teacher(ref: ModelRef, features, x: np.ndarray, checks: Tally,
                  keep: bool = False, rows: int = TEACHER_CHECK_ROWS):
    """The teacher loaded and run on the sampled rows ``x`` (at most ``rows`` of them;
    ``checks`` counts the rows): (its number of classes, its parameter count), and with
    ``keep`` the loaded model and its outputs too."""
    teacher = load_checked("teacher", ref, features, checks)
    logits = check_on_sample("teacher", teacher, x[:rows], checks)
    found = (logits.shape[-1], count_parameters(teacher))
    return (*found, teacher, logits) if keep else found


def _check_job(c: JobConfig) -> None:
    for name in ("batch_size", "teacher_batch_size", "sample_rows"):
        if getattr(c, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if c.output_format not in ("parquet", "tfrecord"):
        raise ValueError(f"--output-format must be parquet or tfrecord, got {c.output_format!r}")
    if c.image is not None and c.tokens is not None:
        raise ValueError("pass either --image-column or --token-column, not both")
    if not 0.0 <= c.max_dead_letter_rate <= 1.0:
        raise ValueError(f"--max-dead-letter-rate must be between 0 and 1, got "
                         f"{c.max_dead_letter_rate}")
    existing = [p for p in storage.list_under(c.output) if not is_lock(p)]  # a lock is no output
    if existing and not c.overwrite:
        raise ValueError(f"output directory {c.output!r} is not empty ({len(existing)} file(s), "
                         f"e.g. {existing[0]}); choose another --output or pass --overwrite to "
                         f"replace a previous run's outputs")


def _check_cascade(c: RunConfig) -> None:
    if c.threshold is not None and c.deferral_rate is not None:
        raise ValueError("pass either --threshold or --deferral-rate, not both")
    if c.threshold is not None and math.isnan(c.threshold):
        raise ValueError("--threshold must be a number (-inf sends every row to the teacher, "
                         "inf none), not NaN")
    if c.deferral_rate is not None and not 0.0 <= c.deferral_rate <= 1.0:
        raise ValueError(f"--deferral-rate must be between 0 and 1, got {c.deferral_rate}")
    if not 0.0 <= c.audit_rate <= 1.0:
        raise ValueError(f"--audit-rate must be between 0 and 1, got {c.audit_rate}")


def _calibration(config: RunConfig) -> tuple[str, float, str | None]:
    """(rule, threshold, learned deferral model) from a `titans calibrate` file."""
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
    return cal["rule"], float(cal["threshold"]), cal.get("deferral_model")


def plan_source(config: JobConfig, phases: Phases | None = None,
                resolved: Resolved | None = None):
    """(the input, the rows sampled from it, the features resolved on them): listed, read and
    sampled here, or taken from ``resolved``; checked the same way either way."""
    if resolved is None:
        fmt, files = list_input(config.input, config.input_format, exclude_under=config.output)
        if config.skip_labeled:  # raises manifest.NothingToLabel when every file is labeled
            from titans.pipeline import manifest

            files = manifest.unlabeled(config.skip_labeled, files, config.output, config.overwrite)
        source = load_input(fmt, files, config.max_record_bytes)
    else:
        source, files = resolved.source, list(resolved.source.files)
    if config.skip_rows:  # positions: Parquet row numbers, TFRecord records' byte offsets
        unknown = set(config.skip_rows) - set(files)
        if unknown:
            raise ValueError(f"rows to skip in files that are not in the input: {sorted(unknown)}")
        source = dataclasses.replace(source, skip=dict(config.skip_rows))
    if source.num_rows == 0:
        raise ValueError(f"the input {config.input!r} has no rows ({len(files)} file(s), all empty)")
    if len(source.conflicts) == len(files):
        raise ValueError("no input file fits the others' schema:\n  "
                         + "\n  ".join(source.conflicts.values()))
    for why in source.conflicts.values():
        _LOG.warning("its rows go to the dead letter: %s", why)
    if config.id_column and config.id_column not in source.schema.names:
        raise ValueError(f"--id-column {config.id_column!r} is not in the input; its columns are "
                         f"{source.schema.names}")
    mark(phases, "input_listing_and_footers")
    if resolved is not None:
        return source, resolved.sample, resolved.features
    sample = source.sample(sample_rows(config, source.num_rows), config.seed)
    if sample.num_rows == 0:
        raise ValueError(f"no row could be sampled from the input {config.input!r}")
    features = resolve_features(source.schema, sample, tuple(config.feature_columns),
                                config.image, config.tokens)
    mark(phases, "sampling")
    return source, sample, features


def sample_rows(config: JobConfig, input_rows: int | None) -> int:
    """Rows to sample at launch: --sample-rows, or for images when it is left at its
    default, a share of the ``input_rows`` (None: not known before reading) within bounds
    (IMAGE_SAMPLE_ROWS, see there)."""
    if config.image is None or config.sample_rows != defaults.SAMPLE_ROWS:
        return config.sample_rows
    share = IMAGE_SAMPLE_ROWS if input_rows is None else int(input_rows * IMAGE_SAMPLE_SHARE)
    return min(config.sample_rows, IMAGE_SAMPLE_ROWS, max(IMAGE_SAMPLE_MIN, share))


def usable_rows(sample: pa.Table, features: FeatureSpec) -> np.ndarray:
    """The models' input for the sampled rows whose features are usable; ValueError (with a
    reason) when none is."""
    return np.concatenate(list(usable_chunks(sample, features)))


def usable_chunks(sample: pa.Table, features: FeatureSpec) -> Iterator[np.ndarray]:
    """``usable_rows`` a batch at a time (``features.batch_rows``: for images, batches capped
    by bytes), each non-empty; ValueError (with a reason) when no row is usable."""
    step, found, example = features.batch_rows(max(1, sample.num_rows)), False, None
    for lo in range(0, sample.num_rows, step):
        x, reasons = feature_matrix(sample.slice(lo, step), features)
        if reasons is not None:
            example = example or next(r for r in reasons if r is not None)
            x = x[np.array([r is None for r in reasons])]
        if len(x):
            found = True
            yield x
    if not found:
        raise ValueError(f"none of the {sample.num_rows:,} sampled rows has usable features "
                         f"in {list(features.columns)} (e.g. {example or 'no rows'}); check "
                         f"--feature-columns, --image-column or --token-column")
