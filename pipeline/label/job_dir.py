"""`titans label`'s job directory DIR: what it holds, what each phase's artifacts depend on,
and who may write there.

``JobDir`` owns
  * the paths: DIR/labels/, dead_letter/, report.json, report.png, _SUCCESS (the cascade's),
    DIR/student.pt and calibration.json, and DIR/_label/ with the phases' own artifacts
    (sample.parquet, teacher/, prelabeled/) and phases.json;
  * phases.json: each phase recorded once its artifacts are in place, with the key that made
    it (``record``); read back by ``--resume``;
  * the keys (``phase_keys``): the content keys (``pipeline/content_keys.py``) of the input
    files and of the teacher's bytes, taken once per command, and the flags each phase
    depends on; a phase is reused only when its key and every earlier phase's key match;
  * the output lock (``pipeline/output_lock.py``), held for the whole job.

Nothing here runs a model or a pipeline: the phases (sample.py ... cascade.py) do, and say
where their artifacts go through this object. It is the state a ``--state`` directory across
runs will build on.
"""
from __future__ import annotations

import json
import logging

from titans.pipeline import content_keys, output_lock
from titans.pipeline.outputs import OUTPUTS, REPORT, SUCCESS
from titans.pipeline.overwrite import REPLACED
from titans.transforms.io import storage

_LOG = logging.getLogger("titans")

WORK = "_label"                     # DIR/_label: the phases' artifacts
STUDENT, CALIBRATION = "student.pt", "calibration.json"
PHASES = ("sample", "teacher labels", "distil", "calibrate", "cascade")
LABEL_OUTPUTS = (*OUTPUTS, STUDENT, CALIBRATION, WORK)
# shares of the labeled sample for validation and calibration (the rest trains the student):
# in the distil phase's key, since they change what it does
VAL_SHARE, CAL_SHARE = 0.10, 0.25

_FLAGS = {"sample_rows": "--sample-rows (rows drawn)", "sample_rows_flag": "--sample-rows",
          "seed": "--seed", "feature_columns": "--feature-columns", "image": "--image-*",
          "column_prefix": "--column-prefix", "student_budget": "--student-budget",
          "eps": "--max-disagreement", "delta": "--delta", "deferral_rate": "--deferral-rate",
          "rule": "--rule", "audit_rate": "--audit-rate", "split": "the sample's split shares",
          "max_dead_letter_rate": "--max-dead-letter-rate", "output_format": "--output-format"}


class JobDir:
    """DIR of one `titans label` job: paths, phases.json, content keys, the output lock."""

    def __init__(self, output: str):
        self.output = output
        self.manifest: dict = {"version": 1, "phases": {}}
        self.content: dict | None = None  # {"files": {path: key}, "teacher": key}
        self._teacher_key: dict | None = None
        self.lock: output_lock.Lock | None = None

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        return storage.join(self.output, *parts)

    def work(self, *parts: str) -> str:
        return storage.join(self.output, WORK, *parts)

    @property
    def student(self) -> str:
        return self.path(STUDENT)

    @property
    def calibration(self) -> str:
        return self.path(CALIBRATION)

    @property
    def sample(self) -> str:
        return self.work("sample.parquet")

    @property
    def teacher(self) -> str:
        return self.work("teacher")

    @property
    def prelabeled(self) -> str:
        return self.work("prelabeled", "sample.parquet")

    @property
    def phases_json(self) -> str:
        return self.work("phases.json")

    def artifact(self, phase: str) -> str:
        """The file whose presence says a phase's artifacts are in place."""
        return {"sample": self.sample, "teacher labels": self.work("teacher", SUCCESS),
                "distil": self.student, "calibrate": self.calibration,
                "cascade": self.path(SUCCESS)}[phase]

    # ------------------------------------------------------------------ the lock
    def acquire(self, overwrite: bool) -> output_lock.Lock:
        """DIR's output lock for the whole job (``with jd.acquire(...)``): released however
        the job ends. ``overwrite``: a dead holder's lock is taken over (--overwrite, --resume)."""
        self.lock = output_lock.acquire(self.output, "label", overwrite=overwrite)
        return self.lock

    # ------------------------------------------------------------------ phases.json
    @property
    def phases(self) -> dict:
        return self.manifest["phases"]

    def record(self, phase: str, key: dict, entry: dict) -> None:
        """Phase ``phase`` is done: its entry, with the key that made it, into phases.json."""
        self.phases[phase] = {"key": key, **entry}
        storage.write_json(self.phases_json, self.manifest)

    def prepare(self, overwrite: bool, resume: bool, sample_key: dict) -> None:
        """Check that DIR may be used and load phases.json to resume from: DIR empty, or
        --overwrite (the previous job's phase files are removed now, after the launch checks;
        its labels at the cascade's end), or
        --resume of a job whose sample was drawn with the same flags (``sample_key``)."""
        existing = [p for p in storage.list_under(self.output) if not output_lock.is_lock(p)]
        if existing and overwrite:
            # the phases' artifacts go now; labels/, dead_letter/, the report and _SUCCESS stay
            # readable until the cascade's last step replaces them (pipeline/overwrite.py)
            for name in LABEL_OUTPUTS:
                if name not in REPLACED:
                    storage.delete_under(self.path(name))
                    storage.delete(self.path(name))
            _LOG.info("--overwrite: removed a previous job's phase files from %s; its labels "
                      "stay until this job's cascade replaces them", self.output)
        elif existing and resume:
            try:
                self.manifest = storage.read_json(self.phases_json)
            except Exception:  # noqa: BLE001 - missing or unreadable: nothing to resume
                raise ValueError(f"--resume: {self.output!r} holds no titans label job to resume "
                                 f"({self.phases_json} is missing); pass --overwrite to start "
                                 f"over there, or another --output") from None
            # other sampling flags would relabel other rows: refused. A changed input (a file
            # rewritten, added or gone) is not refused: its phases are redone (see reusable)
            recorded = self.phases.get("sample", {}).get("key")
            flags = (() if not isinstance(recorded, dict) else ("seed", "sample_rows_flag")
                     if "sample_rows_flag" in recorded else ("seed", "sample_rows"))
            diff = [k for k in flags if recorded.get(k) != sample_key.get(k)]
            if diff:
                what = "; ".join(change_text(k, recorded.get(k), sample_key.get(k)) for k in diff)
                raise ValueError(f"--resume: the sample in {self.output!r} was drawn with other "
                                 f"settings ({what}); rerun with the same flags to reuse its "
                                 f"teacher labels, or pass --overwrite to start over")
        elif existing:
            hint = (" or --resume to continue the titans label job there"
                    if storage.exists(self.phases_json) else "")
            raise ValueError(f"output directory {self.output!r} is not empty ({len(existing)} "
                             f"file(s), e.g. {existing[0]}); choose another --output, pass "
                             f"--overwrite to replace a previous job's outputs{hint}")
        elif resume:
            _LOG.warning("--resume: %s is empty; starting a fresh job", self.output)

    # ------------------------------------------------------------------ keys
    def content_keys(self, files: list[str], teacher: str) -> dict:
        """Content keys of the input files and of the teacher's bytes, taken once per
        command, before any phase reads them: a file rewritten while the job runs then has
        another key next time."""
        if self.content is None:
            self.content = {"files": content_keys.file_keys(files),
                            "teacher": self.teacher_key(teacher)}
        return self.content

    def teacher_key(self, teacher: str) -> dict:
        """The teacher file's content key, taken once per command (the launch asks first)."""
        if self._teacher_key is None:
            self._teacher_key = content_keys.model_key(teacher)
        return self._teacher_key

    def phase_keys(self, c, launch) -> dict[str, dict]:
        """What each phase's artifacts depend on, as JSON values: the contents of the input
        files and of the teacher (content keys, not names), and the flags that change results
        (not batch sizes, devices or resource hints). Each key holds the earlier ones'."""
        job = c.job
        content = self.content_keys(launch.files, job.teacher.path)
        sample = {"files": [[storage.absolute(f), n, content["files"].get(f)]
                            for f, n in zip(launch.files, launch.row_counts)],
                  "sample_rows": launch.sample_rows, "sample_rows_flag": c.sample_rows,
                  "seed": job.seed}
        teacher = {**sample,
                   "teacher": {**content["teacher"], "class": job.teacher.model_class,
                               "kwargs": json.loads(job.teacher.model_kwargs or "null")},
                   "feature_columns": list(job.feature_columns), "column_prefix": job.column_prefix}
        if job.image is not None:  # images: how they are decoded changes the teacher's labels
            teacher["image"] = launch.features.describe()
        if job.tokens is not None:  # token ids: the column, padding and overflow the models read
            t = job.tokens
            teacher["tokens"] = [t.column, t.pad_id, t.max_length, t.overflow]
        distil = {**teacher, "student_budget": c.student_budget, "eps": c.eps, "delta": c.level,
                  "deferral_rate": c.deferral_rate, "rule": c.rule, "audit_rate": c.audit_rate,
                  "split": [VAL_SHARE, CAL_SHARE]}
        cascade = {**distil, "max_dead_letter_rate": job.max_dead_letter_rate}
        if job.output_format != "parquet":
            cascade["output_format"] = job.output_format
        return json.loads(json.dumps({"sample": sample, "teacher labels": teacher,
                                      "distil": distil, "calibrate": distil, "cascade": cascade}))

    def reusable(self, keys: dict, resume: bool, teacher: str) -> list[str]:
        """The phases a --resume reuses: a prefix of PHASES[:4] whose records match and whose
        artifacts are in place; prints why the first phase that is not is redone."""
        reused = []
        for number, name in enumerate(PHASES[:4], 1):
            record = self.phases.get(name) or {}
            same = record.get("key") == keys[name]
            if not same or not storage.exists(self.artifact(name)):
                if resume and record:  # say why a phase the previous run finished is redone
                    why = (what_changed(record.get("key"), keys[name], teacher) if not same
                           else [f"{self.artifact(name)} is missing"])
                    print(f"titans label: --resume: {'; '.join(why)}: phase {number} ({name}) "
                          f"and the phases after it are done again", flush=True)
                break
            reused.append(name)
        return reused

    def complete(self, keys: dict, reused: list[str], resume: bool) -> bool:
        """Whether --resume finds the job done already: every phase reused, the cascade
        finished (_SUCCESS) with the same key, and report.json still this job's (another
        command's --overwrite may have replaced labels/, the report and _SUCCESS since)."""
        cascade = self.phases.get("cascade") or {}
        if not (resume and len(reused) == 4 and cascade.get("key") == keys["cascade"]
                and storage.exists(self.artifact("cascade"))):
            return False
        try:
            report = storage.read_json(self.path(REPORT))
        except Exception:  # noqa: BLE001 - missing or unreadable: not this job's
            return False
        return cascade.get("run_id") is not None and report.get("label_run_id") == cascade["run_id"]


def change_text(name: str, before, now) -> str:
    return f"{_FLAGS.get(name, name)} {before!r} -> {now!r}"


def what_changed(recorded, current: dict, teacher: str) -> list[str]:
    """What differs between a phase's recorded key and its key now, in words: the input
    files and the teacher by name, flags by their names."""
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
        out.append(f"the teacher {teacher} changed ({', '.join(fields)})")
    out += [change_text(k, recorded.get(k), v) for k, v in current.items()
            if k not in ("files", "teacher") and recorded.get(k) != v]
    return out or ["its key changed"]


__all__ = ["JobDir", "PHASES", "STUDENT", "CALIBRATION", "WORK", "VAL_SHARE", "CAL_SHARE"]
