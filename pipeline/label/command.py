"""`titans label`: from a teacher and unlabeled data to labels with a guarantee, in one command.

This module is the command: its config (``LabelConfig``, a ``JobConfig`` plus how to sample,
distil and calibrate), the phase loop and the summary. The rest of ``pipeline/label/``:

  launch.py     the one launch plan: files, footers, schema, resolved features, the teacher
                loaded and checked once, the sample size; every phase reads it
  job_dir.py    DIR: paths, phases.json, the phases' keys (content keys + flags), the lock
  sample.py     1. a seeded simple random sample of N rows over the input files (every row
                of every readable file equally likely) -> DIR/_label/sample.parquet
  teacher.py    2. the teacher-label pipeline on the sample, keeping the teacher's
                probabilities -> DIR/_label/teacher/
  distil.py     3. the labeled sample split into training, validation and calibration rows;
                the cheapest student within the budget -> DIR/student.pt
  calibrate.py  4. Learn then Test on the calibration rows against the teacher's labels, or a
                deferral-rate budget -> DIR/calibration.json (`titans run --calibration`)
  cascade.py    5. the cascade over the input without the sample rows the teacher labeled;
                those go into labels/ as they are -> DIR/labels/, dead_letter/, report.json,
                report.png, _SUCCESS

DIR/_label/phases.json records each phase once its artifacts are in place, with the key that
made it; ``--resume`` reuses a phase when its key matches and every earlier phase was reused,
and says what changed when one does not (a rewritten input file redoes everything, a replaced
teacher everything from the teacher labels on). Other sampling flags (--seed, --sample-rows)
are refused: they would relabel other rows.

Every input `titans run` reads, this command reads (Parquet, TFRecord, GZIP; vectors or
--image-* images, --token-column token ids), through the same planning code; on token ids
the students it distils are bag-of-embeddings models (``models.architectures.TokenMLP``).
"""
from __future__ import annotations

import dataclasses
import sys
import time
import uuid

from titans.models import defaults as train_defaults
from titans.models.deferral import CONFIDENCE_RULES
from titans.models.loading import ModelRef
from titans.pipeline.outputs import REPORT, SUCCESS
from titans.pipeline.label import calibrate, cascade, continual, distil, launch, sample, teacher
from titans.pipeline.label import state_commit
from titans.pipeline.label import defaults as ld
from titans.pipeline.label.job_dir import CALIBRATION, PHASES, STUDENT, JobDir
from titans.pipeline.label.launch import CHECK_ROWS, MIN_LABELED
from titans.pipeline.plan import JobConfig
from titans.transforms.io import storage


@dataclasses.dataclass(frozen=True, kw_only=True)
class LabelConfig:
    """What a user asked `titans label` for: a job (``JobConfig``: input, output, teacher,
    formats, features, batch sizes, seed, ...) and how to sample, distil and calibrate."""
    job: JobConfig
    resume: bool = False
    sample_rows: int | None = None       # the teacher's sample; None: ld.SAMPLE_RULE
    max_disagreement: float | None = None  # EPS; default ld.MAX_DISAGREEMENT without a rate
    delta: float | None = None
    deferral_rate: float | None = None
    student_budget: float = ld.STUDENT_BUDGET
    rule: str | None = None              # None: chosen on the validation rows
    audit_rate: float = ld.AUDIT_RATE
    student_device: str = "cpu"
    state: str | None = None             # --state: the student learns across runs
    state_pool_rows: int = ld.STATE_POOL_ROWS
    state_reset: bool = False

    @property
    def output(self) -> str:
        return self.job.output

    @property
    def eps(self) -> float | None:
        if self.deferral_rate is not None:
            return None
        return ld.MAX_DISAGREEMENT if self.max_disagreement is None else self.max_disagreement

    @property
    def level(self) -> float:
        return train_defaults.DELTA if self.delta is None else self.delta


def config_from_args(a) -> LabelConfig:
    from titans.pipeline.cli.configs import job_fields

    return LabelConfig(
        job=JobConfig(**job_fields(a), sample_rows=CHECK_ROWS), resume=a.resume,
        sample_rows=a.sample_rows, max_disagreement=a.max_disagreement, delta=a.delta,
        deferral_rate=a.deferral_rate, student_budget=a.student_budget, rule=a.rule,
        audit_rate=a.audit_rate, student_device=a.student_device, state=a.state,
        state_pool_rows=a.state_pool_rows, state_reset=a.state_reset)


def run_label(args, beam_args: list[str], start: float | None = None) -> int:
    """The command: 0 done, 1 a pipeline failed its dead-letter budget, 2 a launch check failed."""
    return label(config_from_args(args), beam_args, start)


def label(c: LabelConfig, beam_args: list[str], start: float | None = None) -> int:
    """The job, holding DIR's output lock throughout (released however it ends). Every check
    that can fail at launch -- flags, runner and pipeline options, the devices, the lock, the
    input and the teacher, the write probe -- passes before --overwrite deletes anything."""
    from titans.pipeline.job import job_checks

    start = time.time() if start is None else start
    check_config(c)
    jd = JobDir(c.output)
    job_checks(beam_args, {"teacher": c.job.teacher,
                           "student": ModelRef(jd.student, device=c.student_device)},
               c.job.teacher_resource_hints)  # a GPU without a machine for it: before sampling
    if c.state is None:
        with jd.acquire(overwrite=c.job.overwrite or c.resume) as lock:
            return _label(c, jd, beam_args, start, lock, None)
    from titans.pipeline.state.store import StateDir

    store = StateDir(c.state)
    # the state's lock for the whole run, taken before the output's: one writer per state
    with store.lock(), jd.acquire(overwrite=c.job.overwrite or c.resume) as lock:
        if c.state_reset:
            store.reset()  # takes effect at this run's commit, after its _SUCCESS
        return _label(c, jd, beam_args, start, lock, store)


def _label(c: LabelConfig, jd: JobDir, beam_args: list[str], start: float, lock, store) -> int:
    from titans.pipeline.job import prepare_output

    teacher_sha = jd.teacher_key(c.job.teacher.path)["sha256"]
    base = None if store is None or c.state_reset else store.current()
    vouched = base is not None and base.meta.get("teacher", {}).get("sha256") == teacher_sha
    plan = launch.plan_launch(c, teacher_sha, vouched)
    prepare_output(c.output, overwrite=False)  # the write probe; deletes nothing
    cont = None
    if store is not None:
        # a warm run: a smaller sample; the state checked against this teacher and schema
        cont = continual.begin(c, plan, store, teacher_sha, base)
        cont.job_start = start
        taken = continual.taken_by_state(jd, cont) if c.resume else None
        if taken is not None:
            print(f"titans label: {c.output} is complete already and the state {c.state} took "
                  f"it as generation {taken}; nothing to do")
            return 0
    keys = jd.phase_keys(c, plan)
    if cont is not None:  # --resume reuses phases only while the state is that generation
        for key in keys.values():
            key["state"] = cont.key
    jd.prepare(c.job.overwrite, c.resume, keys["sample"])
    phases = jd.phases
    reused = jd.reusable(keys, c.resume, c.job.teacher.path)
    if jd.complete(keys, reused, c.resume):
        print(f"titans label: {c.output} is complete already (all phases match); nothing to do")
        if cont is not None:  # killed between _SUCCESS and the state's commit: commit now
            _commit_state(c, plan, jd, cont, reused=True)
        return 0
    if not c.job.overwrite:  # --overwrite: the previous labels stay complete until phase 5
        storage.delete(jd.path(SUCCESS))  # the job is not complete until phase 5 says so

    print(f"titans label: {plan.rows:,} rows in {len(plan.files)} file(s); sample of "
          f"{plan.sample_rows:,} rows for the teacher; student budget {c.student_budget:g} of "
          f"the teacher's compute ({plan.teacher_flops:,.0f} FLOPs per row); "
          + (f"guarantee: disagreement with the teacher <= {c.eps:g} with probability >= "
             f"{1 - c.level:g}" if c.eps is not None else
             f"budget: deferral rate {c.deferral_rate:g} (no guarantee)"), flush=True)
    if cont is not None:
        print("titans label: " + continual.describe(cont, c.state), flush=True)

    def done(name: str, entry: dict) -> None:
        jd.record(name, keys[name], entry)

    # 1. sample
    with _Phase(1, "sample", "sample" in reused, phases.get("sample")) as ph:
        if not ph.reused:
            drawn = sample.run(c, plan, jd)
            done("sample", ph.finish(drawn, f"{drawn:,} rows drawn from {len(plan.files)} "
                                            f"file(s) -> {jd.sample}"))
    # 2. teacher labels
    with _Phase(2, "teacher labels", "teacher labels" in reused, phases.get("teacher labels")) as ph:
        if not ph.reused:
            report = teacher.run(c, plan, jd, beam_args, lock)
            if report["status"] != "complete":
                print(f"titans label: the teacher-label phase failed: {report['status']}",
                      file=sys.stderr)
                return 1
            done("teacher labels", ph.finish(report["rows_in"], (
                f"{report['rows_labeled']:,} sample rows labeled by the teacher, "
                f"{report['rows_dead_letter']:,} dead-lettered -> {jd.teacher}/"),
                rows_labeled=report["rows_labeled"], rows_dead_letter=report["rows_dead_letter"],
                rows_teacher_checks=report.get("rows_teacher_checks", 0)))
    labeled = teacher.labeled_sample(plan, jd)
    # 3. distil (a warm --state run: fine-tune yesterday's student, champion / challenger)
    warm = cont is not None and cont.warm
    split = (cont.split(len(labeled.x), c.job.seed) if warm else
             distil.split_sample(len(labeled.x), c.job.seed))
    with _Phase(3, "distil", "distil" in reused, phases.get("distil")) as ph:
        if not ph.reused:
            search = (continual.warm_distil(c, plan, labeled, split, jd, cont,
                                            report=lambda line: print("    " + line, flush=True))
                      if warm else distil.run(c, plan, labeled, split, jd))
            kind = "token model" if search.get("token_vocab") else "MLP"
            done("distil", ph.finish(len(split.train), (
                f"student {kind} {search['arch']} ({search['flops_share']:.2%} of the teacher's "
                f"FLOPs, {search['parameters']:,} parameters), rule {search['rule']}, "
                f"validation agreement {search['val_agreement']:.2%} -> {jd.student}"), **search))
    student_facts = phases["distil"]
    # 4. calibrate
    with _Phase(4, "calibrate", "calibrate" in reused, phases.get("calibrate")) as ph:
        if not ph.reused:
            cal = calibrate.run(c, labeled, split, student_facts, jd)
            done("calibrate", ph.finish(len(split.cal), (
                f"rule {cal['rule']}, threshold {cal['threshold']:.6g}: "
                f"{cal['deferral_rate']:.1%} of the calibration rows to the teacher; "
                f"{cal['guarantee_text']} -> {jd.calibration}"), **cal))
    cal_facts = phases["calibrate"]
    drift = (student_facts.get("continual") or {}).get("drift")
    if drift is not None and "distil" in reused:  # printed by phase 3 when it ran
        print("    " + continual.drift_line(drift), flush=True)
    state_entry = None
    if cont is not None:  # this run's history entry, completed by the cascade's last step
        from titans.pipeline.content_keys import model_key

        cont.heldout_agreement = continual.heldout_agreement(jd, labeled, split)
        sha = model_key(jd.student)["sha256"]

        def state_entry(report: dict) -> dict:
            entry = state_commit.history_entry(c, cont, report, student_facts, cal_facts, sha)
            return {"dir": c.state, "base_generation": cont.key["generation"], "entry": entry,
                    "drift": drift, "history": cont.history + [entry]}
    # 5. cascade
    # the cascade's last step records it in phases.json and writes the whole job's report,
    # then _SUCCESS (_finish_report): nothing is written after it but the state's commit
    with _Phase(5, "cascade", False, None) as ph, _finish_report(jd, keys["cascade"], reused,
                                                                 start, state_entry):
        report = cascade.run(c, plan, labeled, student_facts, cal_facts, phases, jd, beam_args,
                             lock)
        ph.finish(report["rows_cascade_in"], _cascade_summary(report))
    print(job_summary(report))
    if report["status"] != "complete":
        return 1
    if cont is not None:  # after _SUCCESS: the state's new generation, made current
        _commit_state(c, plan, jd, cont, report=report, labeled=labeled, split=split)
    return 0


def _commit_state(c: LabelConfig, plan, jd: JobDir, cont, report: dict | None = None,
                  labeled=None, split=None, reused: bool = False) -> None:
    """Write and commit the state's next generation from the finished job in DIR (its
    report.json holds this run's history entry); on a --resume of a complete job, only when
    the state has not taken this run already."""
    if report is None:
        report = storage.read_json(jd.path(REPORT))
    run_id = report.get("label_run_id")
    lineage = cont.base.meta.get("lineage", []) if cont.base is not None else []
    if reused and lineage and lineage[-1].get("run_id") == run_id:
        return  # committed already
    if labeled is None:
        labeled = teacher.labeled_sample(plan, jd)
    if split is None:
        split = (cont.split(len(labeled.x), c.job.seed) if cont.warm else
                 distil.split_sample(len(labeled.x), c.job.seed))
    t0 = time.time()
    state = state_commit.commit(c, plan, labeled, split, jd, cont, report)
    print(f"titans label: state {c.state}: generation {state.generation} committed "
          f"({state.meta['pool']['rows']:,} pool rows of at most {c.state_pool_rows:,}, "
          f"{len(state.history)} run(s) in its history; {time.time() - t0:.1f} s); history: "
          f"{storage.join(c.state, 'history.png')}, `titans state {c.state}`", flush=True)


def check_config(c: LabelConfig) -> None:
    job = c.job
    if c.resume and job.overwrite:
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
        (job.batch_size >= 1 and job.teacher_batch_size >= 1, "batch sizes must be at least 1"),
        (job.output_format in ("parquet", "tfrecord"),
         f"--output-format must be parquet or tfrecord, got {job.output_format!r}"),
        (0.0 <= job.max_dead_letter_rate <= 1.0,
         f"--max-dead-letter-rate must be between 0 and 1, got {job.max_dead_letter_rate}"),
    ]
    if c.state is not None:
        checks += [
            (c.state_pool_rows >= 0, f"--state-pool-rows must be 0 or more, got "
                                     f"{c.state_pool_rows}"),
            (job.tokens is None, "--state does not take --token-column yet: label token ids "
                                 "without --state"),
        ]
    elif c.state_reset:
        checks.append((False, "--state-reset needs --state DIR (the state to start over)"))
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


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


def _finish_report(jd: JobDir, key: dict, reused: list[str], start: float, state_entry=None):
    """The whole job's figures -- every phase, reused or not, the student search, the job's
    wall time -- handed to the cascade's last step (``job.whole_job``), which records the
    cascade phase in phases.json and adds them to the report before it writes report.json and
    then _SUCCESS, once each. Taken as the cascade phase begins: its start is the phase's."""
    import copy

    from titans.pipeline.job import whole_job

    begun = time.time()
    earlier = {name: {**{k: v for k, v in p.items() if k not in ("key", "candidates")},
                      "reused": name in reused}
               for name, p in jd.phases.items() if name != "cascade"}
    search = jd.phases["distil"].get("candidates")
    manifest, manifest_path = copy.deepcopy(jd.manifest), jd.phases_json

    run_id = uuid.uuid4().hex  # ties phases.json's cascade to this report (JobDir.complete)

    def extend(report: dict, now: float) -> None:  # in the job's last step
        seconds, rows = now - begun, report["rows_cascade_in"]
        entry = {"rows": rows, "seconds": round(seconds, 3),
                 "rows_per_second": round(rows / seconds if seconds > 0 else 0.0, 1),
                 "summary": _cascade_summary(report), "run_id": run_id}
        report["label_run_id"] = run_id
        manifest["phases"]["cascade"] = {"key": key, **entry}  # as JobDir.record does
        storage.write_json(manifest_path, manifest)
        wall = now - start
        report["job_wall_seconds"] = round(wall, 3)
        report["job_rows_per_second"] = round(report["rows_in"] / wall, 1) if wall > 0 else None
        report["phases"] = {**earlier, "cascade": {**entry, "reused": False}}
        report["student_search"] = search
        if state_entry is not None:  # --state: this run's history entry and the history
            report["state"] = state_entry(report)

    return whole_job(extend)


def _cascade_summary(report: dict) -> str:
    return (f"{report['rows_easy']:,} rows labeled by the student, {report['rows_hard']:,} by "
            f"the teacher, {report['rows_dead_letter']:,} dead-lettered")


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
        f"student: {'token model' if report['student_arch'].startswith('emb') else 'MLP'} "
        f"{report['student_arch']}, {report['student_size_vs_teacher']['flops']:.2%} "
        f"of the teacher's FLOPs per row ({report['student_parameters']:,} vs "
        f"{report['teacher_parameters']:,} parameters)",
        f"guarantee: {report['guarantee']}",
    ]
    if report.get("rows_audited"):
        lo, hi = report["audit_disagreement_ci95"]
        lines.append(f"audit: {report['rows_audited']:,} easy rows also sent to the teacher; "
                     f"estimated disagreement over the rows outside the sample "
                     f"{report['audit_disagreement_estimate']:.2%} (95% CI {lo:.2%}-{hi:.2%})")
    state = report.get("state")
    if state:
        e = state["entry"]
        lines.append(f"state: {state['dir']}: " + (
            f"warm start from generation {state['base_generation']}, "
            f"{e['student']['kept']} kept (run {len(state['history'])})" if e["mode"] == "warm"
            else f"cold start (run {len(state['history'])} of a new lineage)"))
        if state.get("drift"):
            lines.append(continual.drift_line(state["drift"]))
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


__all__ = ["LabelConfig", "PHASES", "label", "run_label", "config_from_args", "check_config",
           "job_summary"]
