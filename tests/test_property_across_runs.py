"""Property across runs (issue 16): whatever sequence of `titans run` / `titans label`, with
--overwrite, --skip-labeled MANIFEST, --resume, kills at random points, two runs at once,
input files rewritten / added / removed and the teacher file replaced, what is on disk keeps
the output protocol.

A hypothesis ``RuleBasedStateMachine`` over a small dataset (2-4 Parquet files of 200-350
rows, ~1% rows with a NaN feature), tiny TorchScript models and two output directories.
After every step, from the files on disk (never from titans' report of itself):

* an output holds ``_SUCCESS`` exactly when the last command that changed it completed;
* an output with ``_SUCCESS``: every row id of the input its job ran on (as that input was
  when the job completed; for ``--skip-labeled``, of the files it did not skip) is in exactly
  one of labels/ or dead_letter/, no other id (none of a rewritten or removed file's old rows);
  the rows with a NaN feature are the dead letter; every label with source 'teacher' is what
  the teacher file held at completion gives for that row (computed here with torch);
  report.json and _SUCCESS count the same rows (rows_in = easy + hard + dead letter
  (+ prelabeled for `titans label`)), and ``_SUCCESS`` is the newest file (the output lock
  aside);
* a refused command (exit 2) changed nothing in its output;
* ``--skip-labeled``: a file a run left out is labeled, as it is now, in an output that holds
  ``_SUCCESS``;
* ``titans label --resume`` that exits 0 leaves labels of the current input and teacher;
* of two commands started at once into an empty output, one completes and the other is
  refused (exit 2); into a non-empty one without --overwrite, both are refused.

Commands run in this process (``main()``) where nothing is killed, in a subprocess (its own
session, SIGKILL to the process group) otherwise; `titans label` trains its candidate students
for TRAIN_STEPS (property_runs.py) steps instead of 10,000. A refused command may remove a
killed run's lock it took over (nothing else); the lock file is not counted as an output file.

Known bug, tolerated in the machine and pinned by an xfail(strict) test below:
`titans label --resume` calls an output "complete already" after `titans run --overwrite`
replaced its label job.

Not covered: gs:// outputs, multi-worker runners, input files or the teacher changed *while* a
job runs, two jobs sharing one manifest at once (documented as unsupported), teacher-label.

Profiles (``TITANS_PROPERTY_PROFILE``):
  default  (unset) derandomized, 8 sequences x 15 steps: ~2 minutes on 2 cores, for CI;
  nightly  random draws, 40 sequences x 30 steps (~30 minutes), e.g.
           TITANS_PROPERTY_PROFILE=nightly .venv/bin/python -m pytest \
               tests/test_property_across_runs.py -x -q -p no:cacheprovider
A failure prints the steps (hypothesis' notes are the titans commands, as shell lines).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from hypothesis import HealthCheck, Phase, settings
from hypothesis import note as _hypothesis_note
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 initialize)

from property_runs import (LOCK, SUCCESS, Dataset, Snapshot, driver_command, listing,
                           read_output, save_mlp, success_sig)
import property_runs

RUNNER = ["--runner", "FnApiRunner"]
OUTS = ("a", "b")
TEACHER_HIDDEN, STUDENT_HIDDEN = 64, 6
MIN_FILES, MAX_FILES = 2, 4

settings.register_profile(
    "titans-across-runs-default", max_examples=8, stateful_step_count=15, deadline=None,
    derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck))
settings.register_profile(
    "titans-across-runs-nightly", max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=list(HealthCheck))
PROFILE = os.environ.get("TITANS_PROPERTY_PROFILE", "default")


OUTPUT_NAMES = ("labels", "dead_letter", "report.json", "report.png")


class Expect:
    """What a complete output must hold: made when its job completed."""

    def __init__(self, kind: str, snap: Snapshot, files, sig):
        self.kind = kind            # 'run' or 'label'
        self.snap = snap            # the input and the teacher at completion
        self.files = frozenset(files)  # the input files the job labeled (not skipped)
        self.sig = sig              # its _SUCCESS: (mtime_ns, bytes)
        # a later run was killed there before replacing it (--overwrite replaces at the job's
        # end): its temporary files and, for `titans label`, its phase files may be newer
        self.touched = False

    @property
    def ids(self) -> frozenset:
        return self.snap.ids(self.files)


def _main(argv: list[str]) -> tuple[int, str]:
    """titans in this process: (exit code, stderr)."""
    from titans.pipeline.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse errors
            code = e.code if isinstance(e.code, int) else 2
    return code, err.getvalue()


def note(line: str) -> None:
    """A step, shown with a failing case; printed when the machine is driven by hand (the
    xfail reproductions below, a debugging session)."""
    try:
        _hypothesis_note(line)
    except InvalidArgument:  # outside a hypothesis test
        print(line)


def _shell(argv: list[str]) -> str:
    return "titans " + " ".join(argv)


class AcrossRuns(RuleBasedStateMachine):

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="titans-across-runs-")
        self.data = Dataset(os.path.join(self.tmp, "data"))
        self.student = save_mlp(os.path.join(self.tmp, "student.pt"), STUDENT_HIDDEN, 0)
        self.teacher = os.path.join(self.tmp, "teacher.pt")
        self.manifest = os.path.join(self.tmp, "manifest.json")
        self.expect: dict[str, Expect | None] = {o: None for o in OUTS}
        from titans.models import student_search

        self._steps = student_search.TRAIN_STEPS
        student_search.TRAIN_STEPS = property_runs.TRAIN_STEPS

    def teardown(self):
        from titans.models import student_search

        student_search.TRAIN_STEPS = self._steps
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -------------------------------------------------------------- set-up and edits

    @initialize(sizes=st.lists(st.integers(200, 350), min_size=MIN_FILES, max_size=3),
                seed=st.integers(0, 1000), label_a=st.booleans(), run_b=st.booleans())
    def start(self, sizes, seed, label_a, run_b):
        """The data and teacher; then, drawn, a completed `titans label` in a/ and a completed
        `titans run --skip-labeled` in b/, so that the steps meet finished jobs early."""
        for i, n in enumerate(sizes):
            self.data.add(n, seed + i)
        save_mlp(self.teacher, TEACHER_HIDDEN, seed)
        note(f"# data: files of {sizes} rows, teacher seed {seed}")
        if label_a:
            self.label(out="a", overwrite=False, resume=False, rate=0.3)
        if run_b:
            self.run(out="b", overwrite=False, skip=True)

    @rule(which=st.integers(0, 3), seed=st.integers(0, 1000), keep_mtime=st.booleans())
    def rewrite_input(self, which, seed, keep_mtime):
        name = sorted(self.data.files)[which % len(self.data.files)]
        self.data.rewrite(name, seed, keep_mtime)
        note(f"# rewrite {name}: same row count, new ids (mtime kept: {keep_mtime})")

    @precondition(lambda self: len(self.data.files) < MAX_FILES)
    @rule(n=st.integers(200, 300), seed=st.integers(0, 1000))
    def add_input(self, n, seed):
        name = self.data.add(n, seed)
        note(f"# add {name} ({n} rows)")

    @precondition(lambda self: len(self.data.files) > MIN_FILES)
    @rule(which=st.integers(0, 3))
    def remove_input(self, which):
        name = sorted(self.data.files)[which % len(self.data.files)]
        self.data.remove(name)
        note(f"# remove {name}")

    @rule(seed=st.integers(1001, 2000))
    def replace_teacher(self, seed):
        save_mlp(self.teacher, TEACHER_HIDDEN, seed)
        note(f"# teacher.pt replaced: same architecture, weights of seed {seed}")

    @rule(out=st.sampled_from(OUTS))
    def delete_output_by_hand(self, out):
        shutil.rmtree(self._out(out), ignore_errors=True)
        self.expect[out] = None
        note(f"# rm -r {out}")

    # -------------------------------------------------------------- commands

    def _out(self, out: str) -> str:
        return os.path.join(self.tmp, out)

    def _run_args(self, out, overwrite, skip) -> list[str]:
        return ["run", "--input", self.data.directory, "--output", self._out(out), "--student",
                self.student, "--teacher", self.teacher, "--id-column", "id", "--batch-size",
                "128", "--deferral-rate", "0.3", "--sample-rows", "200",
                *(["--overwrite"] if overwrite else []),
                *(["--skip-labeled", self.manifest] if skip else []), *RUNNER]

    def _label_args(self, out, overwrite, resume, rate) -> list[str]:
        return ["label", "--input", self.data.directory, "--output", self._out(out),
                "--teacher", self.teacher, "--id-column", "id", "--batch-size", "128",
                "--sample-rows", "100", "--deferral-rate", str(rate),
                *(["--overwrite"] if overwrite else []), *(["--resume"] if resume else []),
                *RUNNER]

    def _before(self, out: str) -> dict:
        path = self._out(out)
        files = listing(path)
        return {"files": files, "lock": LOCK in files,
                "empty": not [f for f in files if not f.startswith(LOCK)]}

    @rule(out=st.sampled_from(OUTS), overwrite=st.booleans(), skip=st.booleans())
    def run(self, out, overwrite, skip):
        before = self._before(out)
        argv = self._run_args(out, overwrite, skip)
        note(_shell(argv))
        code, err = _main(argv)
        note(f"# -> exit {code}")
        must = overwrite or (before["empty"] and not before["lock"])
        self._after("run", out, before, code, err, must_succeed=must, skip=skip)

    @rule(out=st.sampled_from(OUTS), overwrite=st.booleans(), resume=st.booleans(),
          rate=st.sampled_from([0.3, 0.5]))
    def label(self, out, overwrite, resume, rate):
        before = self._before(out)
        argv = self._label_args(out, overwrite, resume, rate)
        note(_shell(argv))
        code, err = _main(argv)
        note(f"# -> exit {code}")
        if resume and overwrite:
            must = False
        elif resume:  # a label job that completed: --resume always finishes it
            must = self.expect[out] is not None and self.expect[out].kind == "label"
        else:
            must = overwrite or (before["empty"] and not before["lock"])
        self._after("label", out, before, code, err, must_succeed=must, resume=resume)
        if resume and overwrite:
            assert code == 2, "--resume with --overwrite must be refused"

    @rule(command=st.sampled_from(["run", "label"]), out=st.sampled_from(OUTS),
          overwrite=st.booleans(), flag=st.booleans(),
          when=st.one_of(st.floats(1.0, 8.0), st.sampled_from(["lock", "parquet"])))
    def killed(self, command, out, overwrite, flag, when):
        """A subprocess SIGKILLed (its whole process group) after a delay or once the output
        lock or a new Parquet file appears; flag = --skip-labeled (run) or --resume (label)."""
        before = self._before(out)
        argv = (self._run_args(out, overwrite, flag) if command == "run"
                else self._label_args(out, overwrite, flag, 0.3))
        note(f"{_shell(argv)} &  # SIGKILL at {when!r}")
        start = time.time_ns()
        proc = self._spawn(argv)
        path = self._out(out)
        deadline = time.time() + 90
        while proc.poll() is None and time.time() < deadline:
            if isinstance(when, float):
                if time.time_ns() - start >= when * 1e9:
                    break
            elif when == "lock" and os.path.exists(os.path.join(path, LOCK)):
                break
            elif when == "parquet" and any(
                    f.endswith(".parquet") and mtime > start
                    for f, (_, mtime) in listing(path).items()):
                break
            time.sleep(0.01)
        finished = proc.poll() is not None
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
        err = self._wait(proc)
        if finished:  # it ended on its own before the kill: an ordinary command
            note(f"# -> ended before the kill, exit {proc.returncode}")
            must = None  # the refusal rules are checked on the in-process commands
            self._after(command, out, before, proc.returncode, err, must_succeed=must,
                        skip=command == "run" and flag, resume=command == "label" and flag)
            return
        note("# -> killed")
        self._after_kill(command, out, before, skip=command == "run" and flag,
                         resume=command == "label" and flag)

    @rule(out=st.sampled_from(OUTS), overwrite=st.booleans(),
          second=st.sampled_from(["run", "label"]))
    def two_runs_at_once(self, out, overwrite, second):
        """`titans run` and a second `titans run` or `titans label` into one output, started
        at the same moment."""
        before = self._before(out)
        commands = ["run", second]
        argvs = [self._run_args(out, overwrite, False) if c == "run"
                 else self._label_args(out, overwrite, False, 0.3) for c in commands]
        note(f"{_shell(argvs[0])} & {_shell(argvs[1])} &  # at once")
        procs = [self._spawn(argv) for argv in argvs]
        results = [(p.returncode, err) for p in procs for err in [self._wait(p)]]
        codes = sorted(c for c, _ in results)
        note(f"# -> exits {[c for c, _ in results]}")
        for code, err in results:
            assert code in (0, 2), (code, err[-3000:])
            if code == 2:
                assert "Traceback" not in err and "error" in err, err[-3000:]
        if before["empty"] and not before["lock"]:
            assert codes == [0, 2], ("two runs into one empty output: one must complete, the "
                                     "other be refused", results)
        elif not overwrite:
            assert codes == [2, 2], results
        else:
            assert 0 in codes, results
        if 0 in codes:
            # the one that completed (of two that both did, one after the other: the last)
            with open(os.path.join(self._out(out), "report.json")) as f:
                mode = json.load(f).get("mode")
            done = [c for c, (code, _) in zip(commands, results) if code == 0]
            kind = "label" if mode == "label" else "run"
            assert kind in done, (mode, done)
            self._completed(kind, out, skip=False)
        else:
            self._unchanged(out, before)

    def _spawn(self, argv) -> subprocess.Popen:
        """titans in its own process group (so that a kill takes its workers too); stderr to a
        file, which a chatty run cannot fill up as it could a pipe."""
        err = tempfile.TemporaryFile(mode="w+", dir=self.tmp)
        proc = subprocess.Popen(driver_command(argv), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
        proc.err_file = err
        return proc

    def _wait(self, proc, timeout=180) -> str:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"titans did not end within {timeout} s")
        proc.err_file.seek(0)
        err = proc.err_file.read()
        proc.err_file.close()
        return err

    # -------------------------------------------------------------- what must hold after

    def _changes(self, out, before) -> dict:
        """{file: (before, now)} of what changed in ``out``, but for a killed run's lock taken
        over (--overwrite, --resume) and released by a command that then did nothing: the
        output is no more complete than it was."""
        now, then = listing(self._out(out)), before["files"]
        changed = {f: (then.get(f), now.get(f)) for f in set(now) | set(then)
                   if now.get(f) != then.get(f)}
        if changed.get(LOCK, (None, None))[1] is None:
            changed.pop(LOCK, None)
        return changed

    def _unchanged(self, out, before):
        changed = self._changes(out, before)
        assert not changed, f"a refused command changed {out}/: {changed}"

    def _after(self, command, out, before, code, err, must_succeed, skip=False, resume=False):
        assert code in (0, 2), (f"exit {code}", err[-3000:])
        if code == 2:
            assert must_succeed is not True, ("refused, though it should have run", err[-3000:])
            lines = err.strip().splitlines()
            assert lines and "Traceback" not in err, err[-3000:]
            self._unchanged(out, before)
            return
        path = self._out(out)
        if command == "run" and skip and not self._changes(out, before):
            self._check_manifest_skips(exclude=None)  # nothing to do: all held elsewhere
            return
        sig = success_sig(path)
        assert sig is not None, f"exit 0 but no {SUCCESS} in {out}/"
        old = self.expect[out]
        if not resume:
            assert sig != (old.sig if old else None), \
                f"exit 0 but {out}/{SUCCESS} is the previous job's"
        elif old is not None and old.kind == "run":
            # a `titans run` replaced the label job: --resume must redo it, never call the
            # run's output its own (test_label_resume_after_run_overwrite_is_not_complete_already)
            assert sig != old.sig, f"label --resume took the run's {out}/{SUCCESS} for its own"
        left = [f for f in listing(path) if ".titans-tmp-" in f or "_titans_replaced-" in f]
        assert not left, f"exit 0 but {out}/ keeps temporary or replaced files: {left[:3]}"
        self._completed(command, out, skip=skip)

    def _after_kill(self, command, out, before, skip, resume):
        sig = success_sig(self._out(out))
        old = self.expect[out]
        if sig is None:
            self.expect[out] = None  # visibly incomplete
        elif old is None or sig != old.sig:
            self._completed(command, out, skip=skip)  # killed after it had completed
        # else: the previous job's _SUCCESS is still there: its expectation stands, and the
        # invariant checks that its files are still all there too
        else:
            old.touched = True

    def _completed(self, command, out, skip):
        """A job completed in ``out`` now: what it must hold, from the input and teacher now."""
        snap = self.data.snapshot(self.teacher)
        path = self._out(out)
        files = set(snap.files)
        if command == "run" and skip:
            held = read_output(path)
            got = set(held.label_ids) | set(held.dead_ids)
            files = {n for n, ids in snap.files.items() if ids & got}
            for n in files:
                assert snap.files[n] <= got, f"{n}: only some of its rows in {out}/"
            self._check_manifest_skips(exclude=out, labeled_here=files)
        self.expect[out] = Expect(command, snap, files, success_sig(path))
        self._check(out)

    def _check_manifest_skips(self, exclude, labeled_here=()):
        """Every current file a --skip-labeled run left out is labeled, as it is now, in an
        output that holds _SUCCESS."""
        held = {}
        for o in OUTS:
            if o != exclude and success_sig(self._out(o)) is not None:
                h = read_output(self._out(o))
                held[o] = set(h.label_ids) | set(h.dead_ids)
        for name, ids in self.data.snapshot(self.teacher).files.items():
            if name in labeled_here:
                continue
            assert any(ids <= got for got in held.values()), (
                f"--skip-labeled skipped {name}, whose current rows are in no complete output")

    def _check(self, out):
        path = self._out(out)
        exp = self.expect[out]
        sig = success_sig(path)
        if exp is None:
            assert sig is None, f"{out}/ has {SUCCESS} though no job completed there"
            return
        assert sig == exp.sig, f"{out}/{SUCCESS} changed, though no job completed there"
        held = read_output(path)
        every = held.label_ids + held.dead_ids
        dup = len(every) - len(set(every))
        assert dup == 0, f"{out}/: {dup} id(s) more than once in labels/ and dead_letter/"
        got = set(every)
        stale = got - exp.ids
        missing = exp.ids - got
        assert not stale and not missing, (
            f"{out}/ ({exp.kind}): {len(stale)} id(s) not in its input (e.g. "
            f"{sorted(stale)[:5]}), {len(missing)} input id(s) missing (e.g. "
            f"{sorted(missing)[:5]})")
        assert set(held.dead_ids) == exp.ids & exp.snap.bad, f"{out}/: dead letter"
        wrong = [i for i, s in held.source.items() if s == "teacher"
                 and held.label[i] != exp.snap.teacher[i]]
        assert not wrong, (f"{out}/: {len(wrong)} teacher label(s) differ from what the teacher "
                           f"file at completion gives (e.g. ids {wrong[:5]})")
        with open(os.path.join(path, "report.json")) as f:
            report = json.load(f)
        prelabeled = report.get("rows_prelabeled", 0)
        assert report["status"] == "complete"
        assert report["rows_in"] == len(exp.ids) == (
            report["rows_easy"] + report["rows_hard"] + report["rows_dead_letter"] + prelabeled)
        assert report["rows_dead_letter"] == len(held.dead_ids)
        sources = list(held.source.values())
        assert report["rows_easy"] == sources.count("student")
        assert report["rows_hard"] + prelabeled == sources.count("teacher")
        assert json.loads(exp.sig[1])["rows_in"] == len(exp.ids)
        if exp.kind == "label":
            assert report.get("mode") == "label" and held.sample_files > 0, report.get("mode")
        else:
            assert "rows_prelabeled" not in report and held.sample_files == 0
        newer = {f: m for f, (_, m) in listing(path).items()
                 if not f.startswith(LOCK) and m > exp.sig[0] and ".titans-tmp-" not in f
                 and (not exp.touched or f.split(os.sep)[0] in OUTPUT_NAMES)}
        assert not newer, f"{out}/: files newer than {SUCCESS}: {sorted(newer)}"

    @invariant()
    def outputs_keep_the_protocol(self):
        for out in OUTS:
            self._check(out)


AcrossRuns.TestCase.settings = settings.get_profile(f"titans-across-runs-{PROFILE}")
TestAcrossRuns = AcrossRuns.TestCase


# ------------------------------------------------------------------ bugs the machine found

def test_label_resume_after_run_overwrite_is_not_complete_already(tmp_path, monkeypatch):
    from titans.models import student_search

    monkeypatch.setattr(student_search, "TRAIN_STEPS", property_runs.TRAIN_STEPS)
    data = Dataset(str(tmp_path / "data"))
    data.add(300, seed=1)
    data.add(300, seed=2)
    teacher = save_mlp(str(tmp_path / "teacher.pt"), TEACHER_HIDDEN, 0)
    student = save_mlp(str(tmp_path / "student.pt"), STUDENT_HIDDEN, 1)
    out = tmp_path / "out"
    common = ["--input", data.directory, "--output", str(out), "--teacher", teacher,
              "--id-column", "id", *RUNNER]
    label = ["label", *common, "--sample-rows", "100", "--deferral-rate", "0.3"]
    assert _main(label)[0] == 0
    assert _main(["run", *common, "--student", student, "--overwrite"])[0] == 0
    code, err = _main([*label, "--resume"])
    report = json.loads((out / "report.json").read_text())
    # either refused, or the label job redone: its report, its sample rows in labels/
    assert code == 2 or (report.get("mode") == "label" and list(
        (out / "labels").glob("sample-*.parquet"))), (code, report.get("mode"), err)
