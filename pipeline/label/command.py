"""`titans label`: from a teacher and unlabeled data to labels with a guarantee, in one command.

Five phases; each one's artifacts land in DIR, so a rerun with ``--resume`` after a failure
in a later phase reuses them and never sends a sample row to the teacher again:

  1. sample          a seeded simple random sample of N rows over the input files (every row of
                     every readable file equally likely) -> DIR/_label/sample.parquet: the
                     rows, all their columns, and their file and row numbers
  2. teacher labels  the teacher-label pipeline on the sample, keeping the teacher's
                     probabilities -> DIR/_label/teacher/ (labels, dead letter, report, _SUCCESS)
  3. distil          the labeled sample is split (seeded) into training, validation and
                     calibration rows; students within the budget are distilled with kd on the
                     training rows and the cheapest cascade on the validation rows wins
                     (``titans.models.student_search``) -> DIR/student.pt
  4. calibrate       Learn then Test on the calibration rows against the teacher's labels (no
                     ground truth needed), or a deferral-rate budget -> DIR/calibration.json,
                     which `titans run --calibration` reads
  5. cascade         the cascade pipeline over the input *without* the sample rows the teacher
                     labeled (``JobConfig.skip_rows``); those rows go into labels/ as they are
                     (``RunConfig.prelabeled``, files ``sample-*``, source 'teacher') and into the
                     same report -> DIR/labels/, dead_letter/, report.json, report.png, _SUCCESS

DIR/_label/phases.json records each phase once its artifacts are in place, with the key that
made it: the content keys of the input files and of the teacher (``pipeline/content_keys.py``:
size, time, GCS generation, Parquet footer hash; the model's SHA-256) and the flags the phase
depends on; ``--resume`` reuses a phase when its key matches and every earlier phase was
reused, and says what changed when one does not (a rewritten input file redoes everything, a
replaced teacher everything from the teacher labels on). Other sampling flags (--seed,
--sample-rows) are refused: they would relabel other rows.

A sample row the teacher could not label (bad features, a teacher failure) is not left out of
the cascade: the cascade labels or dead-letters it like any other row, so every input row ends
up exactly once in labels/ or dead_letter/.

The guarantee: the calibration rows are a uniformly random part of a uniformly random sample of
the input, and the student never saw them, so they are exchangeable with the rows outside the
sample; with probability >= 1 - delta over that draw, the share of rows outside the sample
whose label differs from the teacher's is <= EPS (relative to the teacher, not to the truth).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from titans.models import defaults as train_defaults
from titans.transforms.io import storage
from titans.models.calibration import cascade_curve, ltt_threshold
from titans.models.deferral import CONFIDENCE_RULES, make_rule, threshold_for_rate
from titans.models.forward import forward_in_chunks
from titans.models.loading import ModelRef, count_parameters
from titans.transforms.io.models import load_model_file, save_calibration
from titans.models.student_search import (Target, candidate_architectures,
                                          flops_per_row, ltt_bar, search_student)
from titans.pipeline.label import defaults as ld
from titans.pipeline.model_checks import Tally, check_on_sample, load_checked
from titans.pipeline.plan import (CascadePlan, RunConfig, TeacherLabelConfig, plan_run,
                                  plan_teacher_label, usable_rows)
from titans.pipeline.graphs.stages import OUTPUTS, REPORT, SUCCESS, mark_complete
from titans.transforms.features import (FeatureSpec, feature_matrix, first_vector_length,
                                        resolve_feature_spec)
from titans.transforms.labels import LabelColumns
from titans.transforms.io.parquet import (ParquetInput, conform, input_pattern, match_files,
                                          open_parquet)

_LOG = logging.getLogger("titans")

WORK = "_label"                     # DIR/_label: the phases' artifacts
STUDENT, CALIBRATION = "student.pt", "calibration.json"
FILE_COL, ROW_COL = "__titans_file", "__titans_row"  # where a sample row comes from
# shares of the labeled sample: the rest trains the student
VAL_SHARE, CAL_SHARE = 0.10, 0.25
MIN_LABELED = 30                    # labeled sample rows below which nothing can be learnt
CHECK_ROWS = 1000                   # rows read at launch to check the teacher and count its FLOPs
PHASES = ("sample", "teacher labels", "distil", "calibrate", "cascade")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LabelConfig:
    """What a user asked `titans label` for."""
    input: str
    output: str
    teacher: ModelRef
    feature_columns: tuple[str, ...] = ("features",)
    id_column: str | None = None
    batch_size: int = 65536
    teacher_batch_size: int = 16384
    column_prefix: str = ""
    overwrite: bool = False
    resume: bool = False
    sample_rows: int | None = None       # None: ld.SAMPLE_RULE
    seed: int = 0
    teacher_resource_hints: dict = dataclasses.field(default_factory=dict)
    max_dead_letter_rate: float = 0.1
    max_disagreement: float | None = None  # EPS; default ld.MAX_DISAGREEMENT without a rate
    delta: float | None = None
    deferral_rate: float | None = None
    student_budget: float = ld.STUDENT_BUDGET
    rule: str | None = None              # None: chosen on the validation rows
    audit_rate: float = ld.AUDIT_RATE
    student_device: str = "cpu"

    @property
    def eps(self) -> float | None:
        if self.deferral_rate is not None:
            return None
        return ld.MAX_DISAGREEMENT if self.max_disagreement is None else self.max_disagreement

    @property
    def level(self) -> float:
        return train_defaults.DELTA if self.delta is None else self.delta


def config_from_args(a) -> LabelConfig:
    from titans.pipeline.cli.flags import feature_columns, model_ref

    hints = {}
    if a.teacher_accelerator:
        hints["accelerator"] = a.teacher_accelerator
    if a.teacher_min_ram:
        hints["min_ram"] = a.teacher_min_ram
    return LabelConfig(
        input=a.input, output=a.output, teacher=model_ref(a, "teacher"),
        feature_columns=feature_columns(a.feature_columns), id_column=a.id_column,
        batch_size=a.batch_size, teacher_batch_size=a.teacher_batch_size,
        column_prefix=a.column_prefix, overwrite=a.overwrite, resume=a.resume,
        sample_rows=a.sample_rows, seed=a.seed, teacher_resource_hints=hints,
        max_dead_letter_rate=a.max_dead_letter_rate, max_disagreement=a.max_disagreement,
        delta=a.delta, deferral_rate=a.deferral_rate, student_budget=a.student_budget,
        rule=a.rule, audit_rate=a.audit_rate, student_device=a.student_device)


def run_label(args, beam_args: list[str], start: float | None = None) -> int:
    """The command: 0 done, 1 a pipeline failed its dead-letter budget, 2 a launch check failed."""
    try:
        return label(config_from_args(args), beam_args, start)
    except ValueError as e:
        print(f"titans label: error: {e}", file=sys.stderr)
        return 2


# =========================================================================== the job

@dataclasses.dataclass
class _Launch:
    """What the launch checks learnt about the input and the teacher."""
    files: list[str]
    source: ParquetInput
    row_counts: list[int]            # per file; 0 for a file whose rows cannot be read
    features: FeatureSpec
    num_classes: int
    teacher_flops: float
    teacher_parameters: int
    proxy: str
    sample_rows: int
    columns: LabelColumns
    teacher_check_rows: int = 0      # rows these checks ran the teacher on (report.json counts them)
    content: dict | None = None      # content keys of the files and the teacher (_content_keys)

    @property
    def rows(self) -> int:
        return self.source.num_rows

    @property
    def output_schema(self) -> pa.Schema:
        return self.columns.output_schema(self.source.schema, self.columns.cascade_fields())


def label(c: LabelConfig, beam_args: list[str], start: float | None = None) -> int:
    """The job, holding DIR's output lock throughout (released however it ends). Every check
    that can fail at launch -- flags, runner and pipeline options, the devices, the lock, the
    input and the teacher, the write probe -- passes before --overwrite deletes anything."""
    from titans.pipeline import output_lock
    from titans.pipeline.job import job_checks

    start = time.time() if start is None else start
    _check_config(c)
    job_checks(beam_args, {"teacher": c.teacher, "student": ModelRef(
        storage.join(c.output, STUDENT), device=c.student_device)})
    with output_lock.acquire(c.output, "label", overwrite=c.overwrite or c.resume) as lock:
        return _label(c, beam_args, start, lock)


def _label(c: LabelConfig, beam_args: list[str], start: float, lock) -> int:
    from titans.pipeline.job import prepare_output

    launch = _launch_checks(c)
    prepare_output(c.output, overwrite=False)  # the write probe; deletes nothing
    manifest = _prepare_directory(c, launch)
    keys = _phase_keys(c, launch)
    phases = manifest["phases"]
    reused = _reusable(c, phases, keys)
    if _complete(c, phases, keys, reused):
        print(f"titans label: {c.output} is complete already (all phases match); nothing to do")
        return 0
    storage.delete(storage.join(c.output, SUCCESS))  # the job is not complete until phase 5 says so

    print(f"titans label: {launch.rows:,} rows in {len(launch.files)} file(s); sample of "
          f"{launch.sample_rows:,} rows for the teacher; student budget {c.student_budget:g} of "
          f"the teacher's compute ({launch.teacher_flops:,.0f} FLOPs per row); "
          + (f"guarantee: disagreement with the teacher <= {c.eps:g} with probability >= "
             f"{1 - c.level:g}" if c.eps is not None else
             f"budget: deferral rate {c.deferral_rate:g} (no guarantee)"), flush=True)

    def done(name: str, entry: dict) -> None:
        phases[name] = {"key": keys[name], **entry}
        _write_manifest(c.output, manifest)

    # 1. sample
    with _Phase(1, "sample", "sample" in reused, phases.get("sample")) as ph:
        if not ph.reused:
            drawn = _draw_and_read_sample(c, launch)
            done("sample", ph.finish(drawn, f"{drawn:,} rows drawn from {len(launch.files)} "
                                            f"file(s) -> {_work(c, 'sample.parquet')}"))
    # 2. teacher labels
    with _Phase(2, "teacher labels", "teacher labels" in reused, phases.get("teacher labels")) as ph:
        if not ph.reused:
            report = _teacher_phase(c, launch, beam_args, lock)
            if report["status"] != "complete":
                print(f"titans label: the teacher-label phase failed: {report['status']}",
                      file=sys.stderr)
                return 1
            done("teacher labels", ph.finish(report["rows_in"], (
                f"{report['rows_labeled']:,} sample rows labeled by the teacher, "
                f"{report['rows_dead_letter']:,} dead-lettered -> {_work(c, 'teacher')}/"),
                rows_labeled=report["rows_labeled"], rows_dead_letter=report["rows_dead_letter"],
                rows_teacher_checks=report.get("rows_teacher_checks", 0)))
    sample = _labeled_sample(c, launch)
    # 3. distil
    split = split_sample(len(sample.x), c.seed)
    with _Phase(3, "distil", "distil" in reused, phases.get("distil")) as ph:
        if not ph.reused:
            search = _distil_phase(c, launch, sample, split)
            done("distil", ph.finish(len(split.train), (
                f"student MLP {search['arch']} ({search['flops_share']:.2%} of the teacher's "
                f"FLOPs, {search['parameters']:,} parameters), rule {search['rule']}, "
                f"validation agreement {search['val_agreement']:.2%} -> "
                f"{storage.join(c.output, STUDENT)}"), **search))
    student_facts = phases["distil"]
    # 4. calibrate
    with _Phase(4, "calibrate", "calibrate" in reused, phases.get("calibrate")) as ph:
        if not ph.reused:
            cal = _calibrate_phase(c, sample, split, student_facts)
            done("calibrate", ph.finish(len(split.cal), (
                f"rule {cal['rule']}, threshold {cal['threshold']:.6g}: "
                f"{cal['deferral_rate']:.1%} of the calibration rows to the teacher; "
                f"{cal['guarantee_text']} -> {storage.join(c.output, CALIBRATION)}"), **cal))
    cal_facts = phases["calibrate"]
    # 5. cascade
    with _Phase(5, "cascade", False, None) as ph:
        report = _cascade_phase(c, launch, sample, student_facts, cal_facts, phases, beam_args,
                                start, lock)
        done("cascade", ph.finish(report["rows_cascade_in"], (
            f"{report['rows_easy']:,} rows labeled by the student, {report['rows_hard']:,} by "
            f"the teacher, {report['rows_dead_letter']:,} dead-lettered")))
    _finish_report(c, report, phases, reused, start)
    print(job_summary(report))
    return 0 if report["status"] == "complete" else 1


def _check_config(c: LabelConfig) -> None:
    if c.resume and c.overwrite:
        raise ValueError("pass --resume (reuse a previous run's phases) or --overwrite (start "
                         "over), not both")
    if c.deferral_rate is not None and (c.max_disagreement is not None or c.delta is not None):
        raise ValueError("--deferral-rate sets a budget without a guarantee; drop "
                         "--max-disagreement/--delta, or drop --deferral-rate")
    checks = [
        (c.eps is None or 0.0 < c.eps < 1.0, f"--max-disagreement must be in (0, 1), got {c.eps}"),
        (0.0 < c.level < 1.0, f"--delta must be in (0, 1), got {c.level}"),
        (c.deferral_rate is None or 0.0 <= c.deferral_rate <= 1.0,
         f"--deferral-rate must be in [0, 1], got {c.deferral_rate}"),
        (0.0 < c.student_budget <= 1.0, f"--student-budget must be in (0, 1], got "
                                        f"{c.student_budget}"),
        (0.0 <= c.audit_rate <= 1.0, f"--audit-rate must be in [0, 1], got {c.audit_rate}"),
        (c.sample_rows is None or c.sample_rows >= MIN_LABELED,
         f"--sample-rows must be at least {MIN_LABELED}, got {c.sample_rows}"),
        (c.rule is None or c.rule in CONFIDENCE_RULES,
         f"--rule must be one of {CONFIDENCE_RULES}, got {c.rule!r}"),
        (c.batch_size >= 1 and c.teacher_batch_size >= 1, "batch sizes must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def default_sample_rows(rows: int) -> int:
    """``ld.SAMPLE_RULE``: enough rows to distil a small student and to certify a useful
    threshold at EPS = 0.01 (a few thousand calibration rows), few enough that on a large
    input the sample is a small share of the teacher's rows (2% of 1M rows)."""
    n = min(ld.SAMPLE_MAX, max(ld.SAMPLE_MIN, int(round(ld.SAMPLE_SHARE * rows))))
    return min(n, rows // 2)


def _launch_checks(c: LabelConfig) -> _Launch:
    """Files, schema, features, the teacher (loaded and run on real rows), the budget and the
    sample size: everything that can fail before the data is touched."""
    files = match_files(input_pattern(c.input), exclude_under=c.output)
    source = ParquetInput.from_files(files)
    schema, conflicts = source.schema, source.conflicts
    if len(conflicts) == len(files):
        raise ValueError("no input file fits the others' schema:\n  "
                         + "\n  ".join(conflicts.values()))
    clash = [name for name in (FILE_COL, ROW_COL) if name in schema.names]
    if clash:
        raise ValueError(f"the input has column(s) {clash}, which titans label uses internally")
    if c.id_column and c.id_column not in schema.names:
        raise ValueError(f"--id-column {c.id_column!r} is not in the input; its columns are "
                         f"{schema.names}")
    row_counts = [0 if f in conflicts else n for f, n in zip(files, source.file_rows)]
    rows = sum(row_counts)
    if rows < 2 * MIN_LABELED:
        raise ValueError(f"the input has {rows:,} readable row(s); titans label needs at least "
                         f"{2 * MIN_LABELED} (label a small input with `titans teacher-label`)")
    n = default_sample_rows(rows) if c.sample_rows is None else c.sample_rows
    if n >= rows:
        raise ValueError(f"--sample-rows {n:,} is not below the input's {rows:,} readable rows; "
                         f"label it all with `titans teacher-label`, or sample fewer rows")
    check = source.sample(CHECK_ROWS, c.seed)
    features = resolve_feature_spec(schema, tuple(c.feature_columns),
                                    first_vector_length(check, c.feature_columns))
    x = usable_rows(check, features)
    checks = Tally()
    teacher = load_checked("teacher", c.teacher, features, checks)
    logits = check_on_sample("teacher", teacher, x[:256], checks)
    k = logits.shape[-1]
    if k < 2:
        raise ValueError(f"--teacher has {k} output; a classifier needs at least 2 classes")
    teacher_flops, proxy = flops_per_row(teacher, x[:64])
    checks.add(len(x[:64]))
    candidate_architectures(features.dim, k, c.student_budget * teacher_flops)  # budget too small?
    columns = LabelColumns(c.column_prefix)
    columns.output_schema(schema, columns.cascade_fields())  # a clash with an added column?
    return _Launch(files, source, row_counts, features, k, teacher_flops,
                   count_parameters(teacher), proxy, n, columns,
                   teacher_check_rows=checks.rows)


# =========================================================================== the directory

LABEL_OUTPUTS = (*OUTPUTS, STUDENT, CALIBRATION, WORK)


def _work(c: LabelConfig, *parts: str) -> str:
    return storage.join(c.output, WORK, *parts)


def _prepare_directory(c: LabelConfig, launch: _Launch) -> dict:
    """The manifest of phases to resume from ({} phases for a fresh job), after checking that
    ``c.output`` may be used: empty, or --overwrite (the previous job's files are removed
    now, after the launch checks), or --resume of a job with the same sample."""
    from titans.pipeline.output_lock import is_lock

    existing = [p for p in storage.list_under(c.output) if not is_lock(p)]  # the lock: no output
    manifest = {"version": 1, "phases": {}}
    if existing and c.overwrite:
        for name in LABEL_OUTPUTS:
            path = storage.join(c.output, name)
            storage.delete_under(path)
            storage.delete(path)
        _LOG.info("--overwrite: removed a previous job's outputs from %s", c.output)
    elif existing and c.resume:
        try:
            manifest = storage.read_json(_work(c, "phases.json"))
        except Exception:  # noqa: BLE001 - missing or unreadable: nothing to resume
            raise ValueError(f"--resume: {c.output!r} holds no titans label job to resume "
                             f"({_work(c, 'phases.json')} is missing); pass --overwrite to "
                             f"start over there, or another --output") from None
        # other sampling flags would relabel other rows: refused. A changed input (a file
        # rewritten, added or gone) is not refused: its phases are redone (see _reusable)
        key = _phase_keys(c, launch)["sample"]
        recorded = manifest.get("phases", {}).get("sample", {}).get("key")
        flags = (() if not isinstance(recorded, dict) else ("seed", "sample_rows_flag")
                 if "sample_rows_flag" in recorded else ("seed", "sample_rows"))
        diff = [k for k in flags if recorded.get(k) != key.get(k)]
        if diff:
            what = "; ".join(_change_text(k, recorded.get(k), key.get(k)) for k in diff)
            raise ValueError(f"--resume: the sample in {c.output!r} was drawn with other settings "
                             f"({what}); rerun with the same flags to reuse its teacher "
                             f"labels, or pass --overwrite to start over")
    elif existing:
        hint = (" or --resume to continue the titans label job there"
                if storage.exists(_work(c, "phases.json")) else "")
        raise ValueError(f"output directory {c.output!r} is not empty ({len(existing)} file(s), "
                         f"e.g. {existing[0]}); choose another --output, pass --overwrite to "
                         f"replace a previous job's outputs{hint}")
    elif c.resume:
        _LOG.warning("--resume: %s is empty; starting a fresh job", c.output)
    return manifest


def _content_keys(c: LabelConfig, launch: _Launch) -> dict:
    """Content keys (``pipeline/content_keys.py``) of the input files and of the teacher's
    bytes, taken once per command, before any phase reads them: a file rewritten while the
    job runs then has another key next time."""
    if launch.content is None:
        from titans.pipeline import content_keys

        launch.content = {"files": content_keys.file_keys(launch.files),
                          "teacher": content_keys.model_key(c.teacher.path)}
    return launch.content


def _phase_keys(c: LabelConfig, launch: _Launch) -> dict[str, dict]:
    """What each phase's artifacts depend on, as JSON values: the contents of the input files
    and of the teacher (content keys, not names), and the flags that change results (not
    batch sizes, devices or resource hints). A phase is reused only when its key and every
    earlier phase's key match; each key holds the earlier ones'."""
    content = _content_keys(c, launch)
    sample = {"files": [[storage.absolute(f), n, content["files"].get(f)]
                        for f, n in zip(launch.files, launch.row_counts)],
              "sample_rows": launch.sample_rows, "sample_rows_flag": c.sample_rows,
              "seed": c.seed}
    teacher = {**sample,
               "teacher": {**content["teacher"], "class": c.teacher.model_class,
                           "kwargs": json.loads(c.teacher.model_kwargs or "null")},
               "feature_columns": list(c.feature_columns), "column_prefix": c.column_prefix}
    distil = {**teacher, "student_budget": c.student_budget, "eps": c.eps, "delta": c.level,
              "deferral_rate": c.deferral_rate, "rule": c.rule, "audit_rate": c.audit_rate,
              "split": [VAL_SHARE, CAL_SHARE]}
    cascade = {**distil, "max_dead_letter_rate": c.max_dead_letter_rate}
    return json.loads(json.dumps({"sample": sample, "teacher labels": teacher, "distil": distil,
                                  "calibrate": distil, "cascade": cascade}))


_FLAGS = {"sample_rows": "--sample-rows (rows drawn)", "sample_rows_flag": "--sample-rows",
          "seed": "--seed", "feature_columns": "--feature-columns",
          "column_prefix": "--column-prefix", "student_budget": "--student-budget",
          "eps": "--max-disagreement", "delta": "--delta", "deferral_rate": "--deferral-rate",
          "rule": "--rule", "audit_rate": "--audit-rate", "split": "the sample's split shares",
          "max_dead_letter_rate": "--max-dead-letter-rate"}


def _change_text(name: str, before, now) -> str:
    return f"{_FLAGS.get(name, name)} {before!r} -> {now!r}"


def _what_changed(c: LabelConfig, recorded, current: dict) -> list[str]:
    """What differs between a phase's recorded key and its key now, in words: the input
    files and the teacher by name, flags by their names."""
    from titans.pipeline import content_keys

    if not isinstance(recorded, dict):
        return ["its previous run recorded no key"]
    out = []
    if recorded.get("files") != current["files"]:
        def by_path(files):
            return {f[0]: {"rows": f[1], **(f[2] or {})} for f in files}

        old = recorded.get("files")
        if isinstance(old, list) and all(isinstance(f, list) and len(f) == 3 for f in old):
            out += content_keys.describe_file_changes(by_path(old), by_path(current["files"]))
        else:
            out.append("the input files were recorded without content keys (an older titans)")
    if "teacher" in current and recorded.get("teacher") != current["teacher"]:
        old = recorded.get("teacher")
        fields = content_keys.changes(old if isinstance(old, dict) else None, current["teacher"])
        out.append(f"the teacher {c.teacher.path} changed ({', '.join(fields)})")
    out += [_change_text(k, recorded.get(k), v) for k, v in current.items()
            if k not in ("files", "teacher") and recorded.get(k) != v]
    return out or ["its key changed"]


def _reusable(c: LabelConfig, phases: dict, keys: dict) -> list[str]:
    """The phases a --resume reuses: a prefix of PHASES whose records match and whose
    artifacts are in place."""
    artifacts = {"sample": _work(c, "sample.parquet"), "teacher labels": _work(c, "teacher", SUCCESS),
                 "distil": storage.join(c.output, STUDENT),
                 "calibrate": storage.join(c.output, CALIBRATION)}
    reused = []
    for number, name in enumerate(PHASES[:4], 1):
        record = phases.get(name) or {}
        same = record.get("key") == keys[name]
        if not same or not storage.exists(artifacts[name]):
            if c.resume and record:  # say why a phase the previous run finished is redone
                why = (_what_changed(c, record.get("key"), keys[name]) if not same else
                       [f"{artifacts[name]} is missing"])
                print(f"titans label: --resume: {'; '.join(why)}: phase {number} ({name}) and "
                      f"the phases after it are done again", flush=True)
            break
        reused.append(name)
    return reused


def _complete(c: LabelConfig, phases: dict, keys: dict, reused: list[str]) -> bool:
    """Whether --resume finds the job done already: every phase reused and the cascade
    finished (_SUCCESS) with the same key."""
    return (c.resume and len(reused) == 4 and (phases.get("cascade") or {}).get("key") ==
            keys["cascade"] and storage.exists(storage.join(c.output, SUCCESS)))


def _write_manifest(output: str, manifest: dict) -> None:
    storage.write_json(storage.join(output, WORK, "phases.json"), manifest)


class _Phase:
    """Progress of one phase: a line when it starts and one when it ends, with rows/s."""

    def __init__(self, number: int, name: str, reused: bool, record: dict | None):
        self.number, self.name, self.reused, self.record = number, name, reused, record

    def __enter__(self):
        self.start = time.time()
        if self.reused:
            print(f"[{self.number}/5 {self.name}] reused from a previous run (--resume): "
                  f"{self.record.get('summary', '')}", flush=True)
        else:
            print(f"[{self.number}/5 {self.name}] ...", flush=True)
        return self

    def finish(self, rows: int, summary: str, **extra) -> dict:
        seconds = time.time() - self.start
        rate = rows / seconds if seconds > 0 else 0.0
        print(f"[{self.number}/5 {self.name}] {summary}  ({seconds:.1f} s, {rate:,.0f} rows/s)",
              flush=True)
        return {"rows": rows, "seconds": round(seconds, 3), "rows_per_second": round(rate, 1),
                "summary": summary, **extra}

    def __exit__(self, *exc):
        return False


# =========================================================================== 1. sample

def draw_sample(row_counts: list[int], n: int, seed: int) -> list[np.ndarray]:
    """Row numbers (sorted, per file) of a seeded simple random sample of ``n`` of the rows:
    every row of every file equally likely, so files get rows in proportion to their size."""
    total = int(sum(row_counts))
    picked = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    bounds = np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64)
    return [picked[(picked >= a) & (picked < b)] - a for a, b in zip(bounds[:-1], bounds[1:])]


def read_rows(path: str, rows: np.ndarray, file_index: int, schema: pa.Schema,
              batch_size: int) -> tuple[pa.Table, int]:
    """(the rows ``rows`` of one file, conformed to ``schema`` plus their file and row numbers;
    how many could not be conformed, which the cascade will dead-letter). Decodes only the
    row groups that hold a sampled row, ``batch_size`` rows at a time."""
    pf = open_parquet(path)
    meta = pf.metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    target = pa.schema([*schema, pa.field(FILE_COL, pa.int32()), pa.field(ROW_COL, pa.int64())],
                       metadata=schema.metadata)
    tables, bad = [], 0
    for g in range(len(sizes)):
        lo, hi = np.searchsorted(rows, [starts[g], starts[g + 1]])
        if lo == hi:
            continue
        wanted, offset, kept = rows[lo:hi], int(starts[g]), []
        try:
            for batch in pf.iter_batches(batch_size=batch_size, row_groups=[g]):
                here = wanted[(wanted >= offset) & (wanted < offset + batch.num_rows)]
                if here.size:
                    t = pa.Table.from_batches([batch]).take(pa.array(here - offset))
                    t = t.append_column(FILE_COL, pa.array(np.full(here.size, file_index,
                                                                   np.int32)))
                    t = t.append_column(ROW_COL, pa.array(here, pa.int64()))
                    good, rejected, _ = conform(t, target)
                    kept.append(good)
                    bad += 0 if rejected is None else rejected.num_rows
                offset += batch.num_rows
        except Exception as e:  # noqa: BLE001 - a corrupt page: the cascade dead-letters the group
            _LOG.warning("%s: cannot read row group %d (%s: %s); its %d sampled row(s) are left "
                         "to the cascade", path, g, type(e).__name__, e, wanted.size)
            bad += wanted.size
            continue
        tables.extend(kept)
    return (pa.concat_tables(tables) if tables else target.empty_table()), bad


def _draw_and_read_sample(c: LabelConfig, launch: _Launch) -> int:
    per_file = draw_sample(launch.row_counts, launch.sample_rows, c.seed)
    jobs = [(i, f, rows) for i, (f, rows) in enumerate(zip(launch.files, per_file)) if rows.size]
    with ThreadPoolExecutor(min(8, len(jobs))) as pool:
        parts = list(pool.map(lambda j: read_rows(j[1], j[2], j[0], launch.source.schema,
                                                  c.batch_size), jobs))
    table = pa.concat_tables([t for t, _ in parts])
    bad = sum(b for _, b in parts)
    if bad:
        _LOG.warning("%d sampled row(s) do not fit the input schema; the cascade dead-letters them",
                     bad)
    _write_parquet(_work(c, "sample.parquet"), table)
    return launch.sample_rows


def _write_parquet(path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    if not storage.is_url(path):
        import os

        os.makedirs(os.path.dirname(path), exist_ok=True)
    storage.write_bytes(path, buf.getvalue())


# =========================================================================== 2. teacher labels

def _teacher_phase(c: LabelConfig, launch: _Launch, beam_args: list[str], lock=None) -> dict:
    from titans.pipeline.job import run_teacher_label

    config = TeacherLabelConfig(
        input=_work(c, "sample.parquet"), output=_work(c, "teacher"), teacher=c.teacher,
        feature_columns=tuple(c.feature_columns), id_column=c.id_column,
        batch_size=c.batch_size, teacher_batch_size=c.teacher_batch_size,
        column_prefix=c.column_prefix, overwrite=True,  # a failed attempt's files only
        sample_rows=min(CHECK_ROWS, launch.sample_rows), seed=c.seed,
        teacher_resource_hints=c.teacher_resource_hints,
        max_dead_letter_rate=c.max_dead_letter_rate)
    return run_teacher_label(plan_teacher_label(config), beam_args, lock=lock)  # DIR's lock


@dataclasses.dataclass
class LabeledSample:
    """The sample rows the teacher labeled, in (file, row) order."""
    table: pa.Table        # the teacher-label output: input columns, file/row, label, probs
    x: np.ndarray          # features
    probs: np.ndarray      # the teacher's probabilities
    skip: dict             # {path: ((first, end), ...)}: rows the cascade leaves out

    @property
    def teacher_pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def _labeled_sample(c: LabelConfig, launch: _Launch) -> LabeledSample:
    from titans.pipeline.commands.distill import probs_from_column

    paths = [p for p in storage.list_under(_work(c, "teacher", "labels")) if p.endswith(".parquet")]
    tables = [pq.read_table(storage.open_read(p)) for p in paths]
    tables = [t for t in tables if t.num_rows]
    if not tables or sum(t.num_rows for t in tables) < MIN_LABELED:
        raise ValueError(f"the teacher labeled {sum(t.num_rows for t in tables)} sample row(s); "
                         f"at least {MIN_LABELED} are needed (see {_work(c, 'teacher')})")
    table = pa.concat_tables(tables).sort_by([(FILE_COL, "ascending"), (ROW_COL, "ascending")])
    x, reasons = feature_matrix(table, launch.features)
    if reasons is not None:  # the teacher labeled only rows with usable features
        raise ValueError("teacher-labeled sample rows have unusable features")
    probs = probs_from_column(table.column(launch.columns.probs), launch.columns.probs)
    files = table.column(FILE_COL).to_numpy()
    rows = table.column(ROW_COL).to_numpy()
    skip = {launch.files[i]: row_ranges(rows[files == i]) for i in np.unique(files)}
    return LabeledSample(table, x, probs, skip)


def row_ranges(rows: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Sorted row numbers -> ((first, end), ...) runs of consecutive rows."""
    if rows.size == 0:
        return ()
    rows = np.sort(rows)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [rows.size]])
    return tuple((int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, ends))


# =========================================================================== 3. distil

@dataclasses.dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    cal: np.ndarray


def split_sample(n: int, seed: int) -> Split:
    """Seeded split of the labeled sample: CAL_SHARE calibration rows, VAL_SHARE validation
    rows (architecture and rule), the rest training rows."""
    perm = np.random.default_rng([seed, 2]).permutation(n)
    n_cal, n_val = int(round(CAL_SHARE * n)), int(round(VAL_SHARE * n))
    return Split(np.sort(perm[n_cal + n_val:]), np.sort(perm[n_cal:n_cal + n_val]),
                 np.sort(perm[:n_cal]))


def _distil_phase(c: LabelConfig, launch: _Launch, s: LabeledSample, split: Split) -> dict:
    from titans.pipeline.commands.distill import save_student

    target = (Target(deferral_rate=c.deferral_rate) if c.eps is None else
              Target(bar=ltt_bar(len(split.cal), c.eps, c.level)))
    if target.bar is not None and target.bar < 0:
        _LOG.warning("%d calibration rows are too few to certify anything at EPS %g, delta %g: "
                     "every row outside the sample will go to the teacher; raise --sample-rows",
                     len(split.cal), c.eps, c.level)

    def report(cand):
        print(f"    student {cand.arch:>9}: {cand.flops_share:7.2%} of the teacher's FLOPs, "
              f"validation agreement {cand.val_agreement:.2%}, "
              + (f"deferral needed {cand.deferral:.1%}" if c.eps is not None else
                 f"disagreement at the rate {cand.disagreement:.2%}")
              + f" (rule {cand.rule}), {cand.seconds:.1f} s", flush=True)

    epochs_log = logging.getLogger("titans.models.distill")  # a line per epoch: too many here
    level = epochs_log.level
    epochs_log.setLevel(logging.WARNING)
    try:
        result = search_student(
            s.x[split.train], s.probs[split.train], s.x[split.val], s.teacher_pred[split.val],
            teacher_flops=launch.teacher_flops, budget=c.student_budget, target=target,
            rules=(c.rule,) if c.rule else CONFIDENCE_RULES, seed=c.seed,
            audit_rate=c.audit_rate, proxy=launch.proxy, report=report)
    finally:
        epochs_log.setLevel(level)
    best = result.best
    facts = {"arch": best.arch, "rule": best.rule, "flops_per_row": best.flops,
             "flops_share": best.flops_share, "parameters": best.parameters,
             "val_agreement": best.val_agreement, "val_deferral": best.deferral,
             "teacher_flops_per_row": launch.teacher_flops,
             "teacher_parameters": launch.teacher_parameters, "compute_proxy": launch.proxy,
             "budget_flops_per_row": result.budget_flops, "ltt_bar": target.bar,
             "split_rows": {"train": len(split.train), "validation": len(split.val),
                      "calibration": len(split.cal)},
             "training": {"method": "kd", **result.training}, "candidates": result.table()}
    save_student(result.student, storage.join(c.output, STUDENT), {
        "method": "kd", "arch": best.arch, "feature_columns": list(launch.features.columns),
        "feature_dim": launch.features.dim, "num_classes": launch.num_classes,
        "outputs": launch.num_classes, "seed": c.seed, "teacher": storage.absolute(c.teacher.path),
        "train_rows": len(split.train), "val_rows": len(split.val), "rule": best.rule,
        "titans_label": {k: v for k, v in facts.items() if k != "candidates"}})
    return facts


# =========================================================================== 4. calibrate

def calibrate(scores: np.ndarray, student_pred: np.ndarray, teacher_pred: np.ndarray, *,
              eps: float | None, delta: float, deferral_rate: float | None) -> tuple[float, dict | None]:
    """(threshold, LTT result or None) on the calibration rows: the cheapest threshold whose
    disagreement with the teacher is certified <= eps at level delta, or the rate's quantile."""
    if eps is None:
        return threshold_for_rate(scores, deferral_rate), None
    result = ltt_threshold(scores, student_pred, teacher_pred, None, max_accuracy_loss=eps,
                           delta=delta)
    return result["threshold"], result


def guarantee_text(c: LabelConfig, ltt: dict | None, n_sample: int) -> str:
    if ltt is None:
        return (f"no guarantee: --deferral-rate {c.deferral_rate:g} sends about that share of the "
                f"rows outside the sample to the teacher")
    if not ltt["certified"]:
        return (f"nothing certified with {ltt['n']:,} calibration rows at EPS {c.eps:g}, delta "
                f"{c.level:g}: every row outside the sample goes to the teacher (raise "
                f"--sample-rows)")
    return (f"with probability >= {1 - c.level:g} over the draw of the {n_sample:,}-row sample, "
            f"at most {c.eps:g} of the rows outside the sample get a label that differs from the "
            f"teacher's; the sample rows carry the teacher's own labels (relative to the teacher, "
            f"not to the truth; the sample is a uniform random draw from the same rows)")


def _calibrate_phase(c: LabelConfig, s: LabeledSample, split: Split, student: dict) -> dict:
    path = storage.join(c.output, STUDENT)
    model = load_model_file(path)
    logits = forward_in_chunks(model, s.x[split.cal], 65536)
    probs = torch.softmax(logits, dim=-1)
    s_pred, t_pred = probs.argmax(dim=-1).numpy(), s.teacher_pred[split.cal]
    rule = student["rule"]
    all_scores = {name: make_rule(name).score(probs).numpy() for name in CONFIDENCE_RULES}
    scores = all_scores[rule]
    threshold, ltt = calibrate(scores, s_pred, t_pred, eps=c.eps, delta=c.level,
                               deferral_rate=c.deferral_rate)
    hard = scores > threshold
    cascade = np.where(hard, t_pred, s_pred)
    text = guarantee_text(c, ltt, len(s.x))
    record = {
        "rule": rule, "threshold": float(threshold), "method": "budget" if ltt is None else "ltt",
        "deferral_rate": float(hard.mean()), "guarantee": ltt,
        "curves": {name: cascade_curve(v, s_pred, t_pred) for name, v in all_scores.items()},
        "requested": ({"deferral_rate": c.deferral_rate} if ltt is None else
                      {"max_accuracy_loss": c.eps, "target_accuracy": None, "delta": c.level,
                       "bound": ltt["bound"]}),
        "student": storage.absolute(path), "teacher": storage.absolute(c.teacher.path),
        "input": c.input, "feature_columns": list(c.feature_columns), "label_column": None,
        "num_classes": int(probs.shape[1]), "student_outputs": int(probs.shape[1]),
        "seed": c.seed, "n_rows": len(split.cal), "n_fit_rows": 0,
        "n_calibration_rows": len(split.cal), "accuracy_reference": "teacher",
        "cascade_accuracy": float((cascade == t_pred).mean()),
        "cascade_agreement_with_teacher": float((cascade == t_pred).mean()),
        "titans_label": {"guarantee": text, "sample_rows": len(s.x)},
    }
    save_calibration(storage.join(c.output, CALIBRATION), record)
    return {"rule": rule, "threshold": float(threshold), "deferral_rate": float(hard.mean()),
            "certified": None if ltt is None else ltt["certified"], "guarantee_text": text,
            "calibration_disagreement": float((cascade != t_pred).mean())}


# =========================================================================== 5. cascade

@dataclasses.dataclass(frozen=True)
class _LabelPlan(CascadePlan):
    """The cascade's plan, whose facts (what report.json says besides the counts) also cover
    the phases before it."""
    label_facts: dict = dataclasses.field(default_factory=dict)

    def facts(self) -> dict:
        return {**super().facts(), **self.label_facts}


def _cascade_phase(c: LabelConfig, launch: _Launch, s: LabeledSample, student: dict, cal: dict,
                   phases: dict, beam_args: list[str], start: float, lock=None) -> dict:
    from titans.pipeline.graphs.cascade import build_pipeline
    from titans.pipeline.job import run_job

    prelabeled = _work(c, "prelabeled", "sample.parquet")
    table = s.table
    n = table.num_rows
    cols = launch.columns
    out = table.select(launch.source.schema.names + [cols.label, cols.confidence])
    out = out.append_column(cols.deferral_score, pa.nulls(n, pa.float32()))
    out = out.append_column(cols.source, pa.array(["teacher"] * n, pa.string()))
    _write_parquet(prelabeled, out.cast(launch.output_schema))
    config = RunConfig(
        input=c.input, output=c.output, teacher=c.teacher,
        student=ModelRef(storage.join(c.output, STUDENT), device=c.student_device),
        feature_columns=tuple(c.feature_columns), id_column=c.id_column,
        batch_size=c.batch_size, teacher_batch_size=c.teacher_batch_size,
        column_prefix=c.column_prefix,
        overwrite=True,  # removes a failed attempt's labels/, dead_letter/ and report only
        sample_rows=CHECK_ROWS, seed=c.seed, teacher_resource_hints=c.teacher_resource_hints,
        max_dead_letter_rate=c.max_dead_letter_rate, skip_rows=s.skip,
        calibration=storage.join(c.output, CALIBRATION), audit_rate=c.audit_rate,
        prelabeled=prelabeled)
    plan = plan_run(config)
    facts = {
        "mode": "label", "prelabeled": prelabeled, "rows_sample_drawn": launch.sample_rows,
        "max_disagreement": c.eps, "delta": None if c.eps is None else c.level,
        "guarantee": cal["guarantee_text"], "certified": cal["certified"],
        "student_arch": student["arch"], "student_flops_per_row": student["flops_per_row"],
        "teacher_flops_per_row": launch.teacher_flops, "compute_proxy": launch.proxy,
        "student_budget": c.student_budget,
        "student_size_vs_teacher": {
            "flops": student["flops_share"],
            "parameters": plan.student_parameters / max(1, plan.teacher_parameters)},
        "sample_split": student["split_rows"],
        # the teacher's rows in launch checks: this command's, the teacher-label phase's (when
        # it ran, in this run or the one it resumes) and the cascade plan's
        "rows_teacher_checks": (launch.teacher_check_rows + plan.teacher_check_rows
                                + phases.get("teacher labels", {}).get("rows_teacher_checks", 0)),
    }
    label_plan = _LabelPlan(*[getattr(plan, f.name) for f in dataclasses.fields(CascadePlan)],
                            label_facts=facts)
    return run_job(label_plan, build_pipeline, beam_args, time.time(), lock=lock)


def _finish_report(c: LabelConfig, report: dict, phases: dict, reused: list[str],
                   start: float) -> None:
    """The whole job's wall time and phases into report.json; _SUCCESS stays the last file."""
    wall = time.time() - start
    report["job_wall_seconds"] = round(wall, 3)
    report["job_rows_per_second"] = round(report["rows_in"] / wall, 1) if wall > 0 else None
    report["phases"] = {name: {**{k: v for k, v in p.items() if k not in ("key", "candidates")},
                               "reused": name in reused}
                        for name, p in phases.items()}
    report["student_search"] = phases["distil"].get("candidates")
    storage.write_json(storage.join(c.output, REPORT), report)
    if report["status"] == "complete":
        mark_complete(c.output, report)


def job_summary(report: dict) -> str:
    rows, sample, dead = report["rows_in"], report["rows_prelabeled"], report["rows_dead_letter"]
    lines = [
        f"rows: {rows:,}   sample (teacher): {sample:,}   easy (student): "
        f"{report['rows_easy']:,}   hard (teacher): {report['rows_hard']:,}   dead letter: {dead:,}",
        f"teacher rows: {report['rows_to_teacher']:,} ({report['rows_to_teacher_share']:.1%} of "
        f"the rows: sample + hard" + (" + audited" if report.get("rows_audited") else "")
        + (f" + {report['rows_teacher_checks']:,} in launch checks"
           if report.get("rows_teacher_checks") else "") + ")"
        + (f", teacher compute saved against labeling every row with the teacher: "
           f"{report['teacher_compute_saved_share_job']:.1%}"
           if report.get("teacher_compute_saved_share_job") is not None else ""),
        f"student: MLP {report['student_arch']}, {report['student_size_vs_teacher']['flops']:.2%} "
        f"of the teacher's FLOPs per row ({report['student_parameters']:,} vs "
        f"{report['teacher_parameters']:,} parameters)",
        f"guarantee: {report['guarantee']}",
    ]
    if report.get("rows_audited"):
        lo, hi = report["audit_disagreement_ci95"]
        lines.append(f"audit: {report['rows_audited']:,} easy rows also sent to the teacher; "
                     f"estimated disagreement over the rows outside the sample "
                     f"{report['audit_disagreement_estimate']:.2%} (95% CI {lo:.2%}-{hi:.2%})")
    lines.append(f"wall time: {report['job_wall_seconds']:.1f} s for the whole job "
                 f"({report['job_rows_per_second'] or 0:,.0f} rows/s)")
    if dead:
        lines.append("dead-letter reasons: " + "; ".join(
            f"{k:,} x {r}" for r, k in report.get("dead_letter_reasons", {}).items()))
    if report["status"] != "complete":
        lines.append(f"JOB FAILED: {report['status']} (no _SUCCESS marker written)")
    lines.append(f"labels: {report['output']}/labels/  report: {report['output']}/{REPORT}  "
                 f"student: {report['output']}/{STUDENT}  calibration: "
                 f"{report['output']}/{CALIBRATION}")
    return "\n".join(lines)


__all__ = ["LabelConfig", "label", "run_label", "draw_sample", "read_rows", "split_sample",
           "calibrate", "row_ranges", "default_sample_rows"]
