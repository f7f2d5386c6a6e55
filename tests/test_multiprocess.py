"""The pipelines with their SDK workers in separate processes: DirectRunner's multi_processing
mode, as the `titans` command runs it. Every DoFn, coder, model handler and the report and
manifest steps are pickled into worker processes and nothing is shared through module
globals, the cheapest offline proof that the job runs on Dataflow's workers. The results
must be those of the in-process runner, every id exactly once.

Also: one copy of a model per worker machine, shared by its processes (on a GPU)."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from conftest import CLASSES, DIM, RUNNER, features_table, logits_of, save_models, write_dataset
from mp_models import SharedOnAnyDevice, pids, save_pid_model
from test_cascade import _bad_rows_file
from titans.models.deferral import make_rule
from titans.models.learned_deferral import LearnedDeferral
from titans.models.loading import ModelRef
from titans.transforms.io.models import save_learned_deferral
from titans.transforms.features import resolve_feature_spec
from titans.transforms.labels import LabelColumns, StudentLabels

TESTS = os.path.dirname(os.path.abspath(__file__))
MULTI_PROCESS = ["--runner", "DirectRunner", "--direct_running_mode=multi_processing",
                 "--direct_num_workers=2"]
HINT = "type:nvidia-l4;count:1;install-nvidia-driver"
# the titans command, reporting whether the DirectRunner loaded Prism (it must not: the
# pipelines use RunInference's exception handling, which Prism does not run) and whether
# entry_point would skip interpreter teardown (it must not: worker processes to stop)
TITANS = ("import sys\n"
          "from titans.pipeline.cli import main as cli\n"
          "code = cli.main(sys.argv[1:])\n"
          "print('PRISM', 'apache_beam.runners.portability.prism_runner' in sys.modules)\n"
          "print('FAST_EXIT', cli.fast_exit_is_safe(sys.argv[1:]))\n"
          "sys.exit(code)\n")


def titans(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (TESTS, os.environ.get("PYTHONPATH")) if p))  # mp_models in the workers
    return subprocess.run([sys.executable, "-c", TITANS, *args], capture_output=True, text=True,
                          timeout=600, env=env)


def _conflicting_file(directory, first_id: int) -> None:
    """A file whose features column cannot be cast to the others': all its rows dead-lettered."""
    t = pa.table({"id": pa.array([first_id, first_id + 1], pa.int64()),
                  "features": pa.array(["a", "b"]), "note": pa.array(["x", "y"])})
    pq.write_table(t, os.path.join(directory, "zzz-conflict.parquet"))


def _ids(out) -> list[int]:
    ids = pq.read_table(os.path.join(out, "labels")).column("id").to_pylist()
    dead = pq.read_table(os.path.join(out, "dead_letter"))
    return sorted(ids + [json.loads(r)["id"] for r in dead.column("row").to_pylist()])


def _labels(out) -> pa.Table:
    return pq.read_table(os.path.join(out, "labels")).sort_by("id")


def assert_same_labels(a: pa.Table, b: pa.Table) -> None:
    """Row for row; model outputs to float32 rounding (batches may be cut differently)."""
    assert a.column_names == b.column_names and a.num_rows == b.num_rows
    for name in a.column_names:
        if pa.types.is_floating(a.schema.field(name).type):
            np.testing.assert_allclose(a.column(name).to_numpy(), b.column(name).to_numpy(),
                                       rtol=1e-5, atol=1e-6)
        elif name.endswith("probs"):
            np.testing.assert_allclose(np.stack(a.column(name).to_numpy(zero_copy_only=False)),
                                       np.stack(b.column(name).to_numpy(zero_copy_only=False)),
                                       rtol=1e-5, atol=1e-6)
        else:
            assert a.column(name).equals(b.column(name)), name


def _learned_rule(student: str, x: np.ndarray, path: str) -> str:
    probs = torch.softmax(logits_of(student, x[:1000]), -1).numpy()
    wrong = np.random.default_rng(0).random(1000) < 0.3
    save_learned_deferral(LearnedDeferral().fit(probs, wrong), path)
    return path


def test_cascade_in_worker_processes_labels_every_row_once_like_the_in_process_runner(tmp_path):
    data = tmp_path / "data"
    x = write_dataset(data, 3000, files=3, row_group_size=400)
    _bad_rows_file(data, 3000)
    _conflicting_file(data, 5000)
    student, _ = save_models(tmp_path)
    teacher, teacher_class, teacher_kwargs = save_pid_model(
        tmp_path, DIM, CLASSES, (32, 32), tmp_path / "pids")
    deferral_model = _learned_rule(student, x, str(tmp_path / "learned.json"))
    args = ["run", "--input", str(data), "--student", student, "--teacher", teacher,
            "--teacher-class", teacher_class, "--teacher-class-kwargs", teacher_kwargs,
            "--id-column", "id", "--rule", "learned", "--deferral-model", deferral_model,
            "--deferral-rate", "0.3", "--audit-rate", "0.2", "--batch-size", "256",
            "--teacher-batch-size", "128",
            # the teacher in an environment of its own (its own worker processes here),
            # reached through the fusion break, as on Dataflow's GPU pool
            "--teacher-accelerator", HINT, "--teacher-min-ram", "1GB"]
    manifest = str(tmp_path / "manifest.json")
    out = str(tmp_path / "out")
    done = titans(*args, "--output", out, "--skip-labeled", manifest, *MULTI_PROCESS)
    assert done.returncode == 0, done.stderr
    assert "PRISM False" in done.stdout and "FAST_EXIT False" in done.stdout

    assert _ids(out) == list(range(3004)) + [5000, 5001]  # every id exactly once
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["status"] == "complete" and report["conservation_ok"]
    assert report["rows_in"] == 3006 and report["rows_dead_letter"] == 5
    assert report["rows_audited"] > 0 and report["runner"] == "DirectRunner"
    assert report["metrics"]["teacher_rows"] == report["rows_teacher_scored"]
    assert report["metrics"]["student_rows"] == 3001
    success = json.loads(open(os.path.join(out, "_SUCCESS")).read())
    assert success["rows_in"] == 3006
    # the teacher was built by worker processes, not only by the launcher's checks
    launcher_and_workers = pids(tmp_path / "pids")
    assert len(launcher_and_workers) >= 2, launcher_and_workers
    # the manifest, written by the job's last step in a worker, lists every input file
    files = json.loads(open(manifest).read())["files"]
    assert sorted(files) == sorted(str(p) for p in data.iterdir())

    # the same job on the in-process runner: the same labels, row for row
    reference = str(tmp_path / "reference")
    done = titans(*args, "--output", reference, *RUNNER)
    assert done.returncode == 0, done.stderr
    assert "FAST_EXIT True" in done.stdout
    assert_same_labels(_labels(out), _labels(reference))
    assert json.loads(open(os.path.join(reference, "report.json")).read())[
        "rows_audited"] == report["rows_audited"]


def test_teacher_label_in_worker_processes(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 2000, files=2, row_group_size=300)
    _bad_rows_file(data, 2000)
    teacher, teacher_class, teacher_kwargs = save_pid_model(
        tmp_path, DIM, CLASSES, (32, 32), tmp_path / "pids")
    args = ["teacher-label", "--input", str(data), "--teacher", teacher, "--teacher-class",
            teacher_class, "--teacher-class-kwargs", teacher_kwargs, "--id-column", "id",
            "--batch-size", "256"]
    out, reference = str(tmp_path / "out"), str(tmp_path / "reference")
    done = titans(*args, "--output", out, *MULTI_PROCESS)
    assert done.returncode == 0, done.stderr
    assert "PRISM False" in done.stdout and "FAST_EXIT False" in done.stdout
    assert _ids(out) == list(range(2004))
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["status"] == "complete" and report["conservation_ok"]
    assert report["rows_labeled"] == 2001 and report["rows_dead_letter"] == 3
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    assert len(pids(tmp_path / "pids")) >= 2
    assert titans(*args, "--output", reference, *RUNNER).returncode == 0
    assert_same_labels(_labels(out), _labels(reference))


def _load_and_score(handler, x, barrier, results) -> None:
    loaded = handler.load_model()
    results.put((os.getpid(), loaded.device, handler.forward(loaded, x)))
    barrier.wait(timeout=120)  # every process keeps the shared copy alive until all are done
    results.close()
    results.join_thread()
    # end like an SDK worker at the end of a job: the copy's server threads (daemon threads,
    # Beam's MultiProcessShared) are not joined; interpreter teardown under them can abort
    os._exit(0)


def test_processes_of_a_worker_share_one_copy_of_the_model(tmp_path):
    """What a GPU worker does with the teacher (one copy, not one per SDK process), forced on
    for the CPU here; spawned processes stand for a worker's SDK processes."""
    teacher, teacher_class, teacher_kwargs = save_pid_model(
        tmp_path, DIM, CLASSES, (32, 32), tmp_path / "pids")
    features = resolve_feature_spec(features_table(np.arange(1), np.zeros((1, DIM))).schema,
                                    ("features",), DIM)
    columns = LabelColumns("")
    handler = SharedOnAnyDevice(ModelRef(teacher, teacher_class, teacher_kwargs), features,
                                StudentLabels(make_rule("margin"), columns), batch_size=64,
                                name="teacher")
    x = np.random.default_rng(0).normal(size=(100, DIM)).astype(np.float32)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_load_and_score, args=(handler, x, barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({pid for pid, _, _ in got}) == 2
    assert len(pids(tmp_path / "pids")) == 1  # built once, by one of the two processes
    assert pids(tmp_path / "pids") <= {pid for pid, _, _ in got}
    expected = logits_of_state_dict(teacher, x)
    for _, device, logits in got:
        assert device == "cpu"  # the process sends and receives CPU tensors
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def logits_of_state_dict(path: str, x: np.ndarray) -> np.ndarray:
    from titans.models.architectures import MLP

    model = MLP(DIM, CLASSES, (32, 32))
    model.load_state_dict(torch.load(path, weights_only=True))
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()
