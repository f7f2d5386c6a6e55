"""`titans distill` and `titans calibrate` in-process, on real Parquet files and real models."""
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import CLASSES, DIM, features_table, save_models
from titans.models.architectures import MLP
from titans.models.deferral import make_rule
from titans.pipeline.cli.main import main
from titans.pipeline.commands.datasets import split_rows
from titans.transforms.io.models import (load_calibration, load_learned_deferral, load_model_file,
                                         save_torchscript)

N = 1200


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(*argv) -> int:
    """`titans distill|calibrate ...`, in this process."""
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two Parquet files with features, labels y (the teacher's argmax, 15% flipped) and the
    teacher's probabilities as a list column; the student and teacher TorchScript files."""
    d = tmp_path_factory.mktemp("world")
    student, teacher = save_models(str(d))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, DIM)).astype(np.float32)
    with torch.inference_mode():
        probs = torch.softmax(torch.jit.load(teacher)(torch.from_numpy(x)), dim=-1).numpy()
    y = probs.argmax(axis=1)
    flip = rng.random(N) < 0.15
    y[flip] = rng.integers(0, CLASSES, flip.sum())
    os.makedirs(d / "data")
    for i, rows in enumerate(np.array_split(np.arange(N), 2)):
        table = features_table(rows, x[rows])
        table = table.append_column("y", pa.array(y[rows], pa.int64()))
        table = table.append_column("teacher_probs", pa.FixedSizeListArray.from_arrays(
            pa.array(probs[rows].ravel()), CLASSES))
        pq.write_table(table, d / "data" / f"part-{i}.parquet")
    return {"dir": d, "data": str(d / "data"), "student": student, "teacher": teacher, "x": x,
            "y": y}


DISTILL = ("--epochs", "2", "--batch-size", "128")


def weights(path):
    return torch.jit.load(path).state_dict()


def test_distill_from_teacher_and_from_its_probabilities_column(world, tmp_path, capsys):
    a, b, c = (tmp_path / f"{n}.pt" for n in "abc")
    assert cli("distill", "--train", world["data"], "--teacher", world["teacher"], "--out", a,
               "--method", "kd", *DISTILL) == 0
    out = capsys.readouterr().out
    assert "read 1,200 rows" in out and "validated on 120" in out and str(a) in out
    assert cli("distill", "--train", world["data"], "--teacher", world["teacher"], "--out", b,
               "--method", "kd", *DISTILL) == 0
    # the column written by the same teacher gives the same probabilities, so the same student
    assert cli("distill", "--train", world["data"], "--teacher-probs", "teacher_probs",
               "--out", c, "--method", "kd", *DISTILL) == 0
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wc[k]) for k in wa)

    model = load_model_file(str(a))
    assert model(torch.from_numpy(world["x"][:5])).shape == (5, CLASSES)
    extra = {"titans.json": ""}
    torch.jit.load(str(a), _extra_files=extra)
    meta = json.loads(extra["titans.json"])
    assert meta["method"] == "kd" and meta["num_classes"] == CLASSES and meta["seed"] == 0
    assert meta["feature_columns"] == ["features"] and meta["final"]["val_agreement"] > 0.5


def test_distill_defer_with_labels_has_k_plus_1_outputs(world, tmp_path, capsys):
    out = tmp_path / "defer.pt"
    assert cli("distill", "--train", world["data"], "--teacher-probs", "teacher_probs",
               "--label-column", "y", "--out", out, "--method", "defer", "--seed", "3",
               *DISTILL) == 0
    printed = capsys.readouterr().out
    assert "--rule defer_head" in printed and "accuracy" in printed
    assert load_model_file(str(out))(torch.zeros(2, DIM)).shape == (2, CLASSES + 1)


def test_calibrate_budget_writes_curves_learned_model_and_plot(world, tmp_path, capsys):
    cal, plot = tmp_path / "CAL.json", tmp_path / "curve.png"
    assert cli("calibrate", "--input", world["data"], "--student", world["student"],
               "--teacher", world["teacher"], "--out", cal, "--deferral-rate", "0.2",
               "--plot", plot) == 0
    printed = capsys.readouterr().out
    assert "no accuracy guarantee" in printed and "AUC" in printed and "@20%" in printed

    data = load_calibration(str(cal))
    assert set(data["curves"]) == {"max_prob", "margin", "entropy", "learned"}
    assert data["rule"] == "margin" and data["method"] == "budget" and data["guarantee"] is None
    assert data["n_fit_rows"] == data["n_calibration_rows"] == N // 2
    assert data["accuracy_reference"] == "teacher" and "teacher_accuracy" not in data
    assert os.path.isabs(data["deferral_model"]) and data["deferral_model"].endswith("CAL.learned.json")
    load_learned_deferral(data["deferral_model"])
    assert plot.stat().st_size > 0 and plot.read_bytes()[:4] == b"\x89PNG"

    # the threshold realises the rate on the held-out half, recomputed here from scratch
    held, _ = split_rows(N, 0.5, 0)
    with torch.inference_mode():
        _, score = make_rule("margin")(torch.jit.load(world["student"])(torch.from_numpy(world["x"])))
    realised = float((score.numpy()[held] > data["threshold"]).mean())
    assert realised == pytest.approx(0.2, abs=0.005) and realised == data["deferral_rate"]


def binom_cdf(k, n, p):
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k + 1))


def linear_model(path, rows):
    """TorchScript of logits = W x with W given row by row (no bias): a model whose outputs
    are chosen through the features."""
    model = MLP(len(rows[0]), len(rows), ())
    with torch.no_grad():
        model.net[0].weight.copy_(torch.tensor(rows, dtype=torch.float32))
        model.net[0].bias.zero_()
    save_torchscript(model, str(path))
    return str(path)


def test_calibrate_ltt_certifies_the_threshold_worked_out_by_hand(tmp_path, capsys):
    """100 rows, features (u, v, s, t0, t1). The student's logits are (u, v, s) with a defer
    output (so every row is calibrated on, no half is set aside), the teacher's (t0, t1).
    u, v = 1, 0: the student always says class 0, and its defer score e^s / (1 + e + e^s)
    grows with s = rank. The teacher says 1 at ranks 10, 20, 30 and the labels agree with
    it there (the student's only costly mistakes); at rank 95 the label is 1 and both are
    wrong (no loss from keeping it). Losses among rows kept easy at threshold = score of rank
    r: 0 for r <= 9, 1 for 10..19, 2 from 20. P(Bin(100, .05) <= 1) = .037 <= delta = .1 <
    P(Bin(100, .05) <= 2) = .118, so Learn then Test certifies up to rank 19 and stops at 20.
    """
    n = 100
    s = np.arange(n) / 10.0 - 5.0
    teacher_says_1 = np.isin(np.arange(n), (10, 20, 30))
    x = np.stack([np.ones(n), np.zeros(n), s, (~teacher_says_1).astype(float),
                  teacher_says_1.astype(float)], axis=1).astype(np.float32)
    y = teacher_says_1.astype(np.int64)
    y[95] = 1
    os.makedirs(tmp_path / "data")
    pq.write_table(features_table(np.arange(n), x).append_column("y", pa.array(y)),
                   tmp_path / "data" / "part-0.parquet")
    eye = np.eye(5).tolist()
    student = linear_model(tmp_path / "student.pt", eye[:3])
    teacher = linear_model(tmp_path / "teacher.pt", eye[3:])

    cal = tmp_path / "cal.json"
    assert cli("calibrate", "--input", tmp_path / "data", "--student", student,
               "--teacher", teacher, "--out", cal, "--label-column", "y",
               "--max-accuracy-loss", "0.05", "--delta", "0.1", "--seed", "1") == 0
    assert "guarantee: with probability >= 0.9" in capsys.readouterr().out
    data = load_calibration(str(cal))
    score_19 = math.exp(s[19]) / (1 + math.e + math.exp(s[19]))
    expected = {
        "threshold": pytest.approx(score_19, rel=1e-6), "deferral_rate": 0.8, "risk": 0.01,
        "p_value": pytest.approx(binom_cdf(1, 100, 0.05), rel=1e-6), "eps": 0.05, "delta": 0.1,
        "n": 100, "bound": "binomial", "mode": "loss_vs_teacher_labels", "certified": True,
        "n_rejected": 21,  # -inf and the scores of ranks 0..19
        "guarantee": "with probability >= 0.9 over the calibration draw, the share of rows the "
                     "student gets wrong where the teacher is right (an upper bound on the "
                     "accuracy loss vs the teacher) is <= 0.05, assuming calibration and test "
                     "rows are exchangeable",
    }
    assert data["rule"] == "defer_head" and data["n_calibration_rows"] == n
    assert data["method"] == "ltt" and data["guarantee"] == expected
    assert data["threshold"] == expected["threshold"]
    assert data["accuracy_reference"] == "labels" and 0 < data["teacher_accuracy"] < 1


def test_calibrate_defer_student_uses_defer_head(world, tmp_path):
    torch.manual_seed(0)
    defer = str(tmp_path / "defer.pt")
    save_torchscript(MLP(DIM, CLASSES + 1, (6,)), defer)
    cal = tmp_path / "cal.json"
    assert cli("calibrate", "--input", world["data"], "--student", defer, "--teacher",
               world["teacher"], "--out", cal, "--deferral-rate", "0.3") == 0
    data = load_calibration(str(cal))
    assert data["rule"] == "defer_head" and "learned" not in data["curves"]
    assert data["n_calibration_rows"] == N and data["n_fit_rows"] == 0


def test_calibrate_skips_learned_when_the_student_is_never_wrong(world, tmp_path, capsys):
    t, cal = world["teacher"], tmp_path / "cal.json"
    base = ("calibrate", "--input", world["data"], "--student", t, "--teacher", t, "--out", cal,
            "--deferral-rate", "0.1")
    assert cli(*base) == 0
    assert "note: rule learned skipped: cannot learn when the student is wrong on 0 of 600" in \
        capsys.readouterr().out
    data = load_calibration(str(cal))
    assert "learned" not in data["curves"] and "deferral_model" not in data
    assert not (tmp_path / "cal.learned.json").exists()
    assert cli(*base, "--rule", "learned") == 2
    assert "--rule learned: the learned deferral model could not be fitted" in capsys.readouterr().err


@pytest.fixture(scope="module")
def odd_inputs(world):
    """Small files that are wrong in one way each."""
    d = world["dir"] / "odd"
    os.makedirs(d)
    x = np.zeros((6, DIM), np.float32)
    base = features_table(np.arange(6), x)

    def write(name, **columns):
        table = base
        for col, arr in columns.items():
            table = table.append_column(col, arr)
        pq.write_table(table, d / name)
        return str(d / name)

    ragged = pa.array([[0.25] * CLASSES] * 5 + [[0.5, 0.5]], pa.list_(pa.float32()))
    return {
        "ragged": write("ragged.parquet", p=ragged),
        "scalar": write("scalar.parquet", p=pa.array(np.zeros(6), pa.float64())),
        "logits": write("logits.parquet", p=pa.array([[2.0, -1.0, 0.0, 0.5]] * 6,
                                                     pa.list_(pa.float32()))),
        "bad_y": write("bad_y.parquet", y=pa.array([0, 1, 2, 3, 4, 9], pa.int64())),
        "empty": write("empty.parquet", y=pa.array([None] * 6, pa.int64())),
        "float_y": write("float_y.parquet", y=pa.array(np.zeros(6), pa.float64())),
    }


@pytest.mark.parametrize("case, message", [
    ("no_files", "no non-empty file matches"),
    ("missing_features", "feature column(s) ['pixels'] not in the input"),
    ("both_teachers", "exactly one of --teacher MODEL"),
    ("no_teacher", "exactly one of --teacher MODEL"),
    ("ragged_probs", "do not hold 4 finite numbers"),
    ("scalar_probs", "must be a list of K probabilities"),
    ("logit_probs", "if it holds logits"),
    ("missing_probs", "--teacher-probs 'nope' is not in the input"),
    ("labels_out_of_range", "holds values from 0 to 9, but the teacher has 4 classes"),
    ("float_labels", "must hold integer class ids"),
    ("empty", "no usable rows"),
    ("bad_arch", "must be comma-separated layer widths"),
])
def test_distill_errors(world, odd_inputs, tmp_path, capsys, case, message):
    t, out = world["teacher"], tmp_path / "s.pt"
    common = ("--out", out, "--method", "kd", *DISTILL)
    argv = {
        "no_files": ("--train", tmp_path / "nothing", "--teacher", t),
        "missing_features": ("--train", world["data"], "--teacher", t, "--feature-columns", "pixels"),
        "both_teachers": ("--train", world["data"], "--teacher", t, "--teacher-probs", "teacher_probs"),
        "no_teacher": ("--train", world["data"]),
        "ragged_probs": ("--train", odd_inputs["ragged"], "--teacher-probs", "p"),
        "scalar_probs": ("--train", odd_inputs["scalar"], "--teacher-probs", "p"),
        "logit_probs": ("--train", odd_inputs["logits"], "--teacher-probs", "p"),
        "missing_probs": ("--train", world["data"], "--teacher-probs", "nope"),
        "labels_out_of_range": ("--train", odd_inputs["bad_y"], "--teacher", t, "--label-column", "y"),
        "float_labels": ("--train", odd_inputs["float_y"], "--teacher", t, "--label-column", "y"),
        "empty": ("--train", odd_inputs["empty"], "--teacher", t, "--label-column", "y"),
        "bad_arch": ("--train", world["data"], "--teacher", t, "--student-arch", "wide"),
    }[case]
    assert cli("distill", *argv, *common) == 2
    err = capsys.readouterr().err
    assert err.startswith("titans distill: error: ") and message in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("case, message", [
    ("no_mode", "exactly one of --deferral-rate R"),
    ("target_without_labels", "--target-accuracy needs --label-column"),
    ("delta_in_budget", "--delta and --bound go with"),
    ("class_mismatch", "the student has 3 outputs but the teacher has 4 classes"),
    ("defer_head_on_k_student", "--rule defer_head needs a student with K+1 outputs"),
    ("missing_label_column", "--label-column 'label' is not in the input"),
    ("out_dir_missing", "does not exist"),
    ("bad_rate", "--deferral-rate must be in [0, 1]"),
])
def test_calibrate_errors(world, tmp_path, capsys, case, message):
    s, t = world["student"], world["teacher"]
    three = str(tmp_path / "three.pt")
    save_torchscript(MLP(DIM, 3, ()), three)
    out = tmp_path / "cal.json"
    base = ["--input", world["data"], "--teacher", t, "--out", out]
    argv = {
        "no_mode": ["--student", s],
        "target_without_labels": ["--student", s, "--target-accuracy", "0.9"],
        "delta_in_budget": ["--student", s, "--deferral-rate", "0.2", "--delta", "0.05"],
        "class_mismatch": ["--student", three, "--deferral-rate", "0.2"],
        "defer_head_on_k_student": ["--student", s, "--deferral-rate", "0.2", "--rule", "defer_head"],
        "missing_label_column": ["--student", s, "--deferral-rate", "0.2", "--label-column", "label"],
        "out_dir_missing": ["--student", s, "--deferral-rate", "0.2", "--out", tmp_path / "no" / "c.json"],
        "bad_rate": ["--student", s, "--deferral-rate", "1.5"],
    }[case]
    assert cli("calibrate", *base, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("titans calibrate: error: ") and message in err, err
    assert "Traceback" not in err and not out.exists() and not (tmp_path / "cal.learned.json").exists()


@pytest.mark.parametrize("command", ["distill", "calibrate"])
def test_distill_and_calibrate_refuse_beam_options(world, tmp_path, capsys, command):
    """They start no pipeline: a Beam option there is a mistake, not something to pass on."""
    argv = {"distill": ("--train", world["data"], "--teacher", world["teacher"], "--method", "kd"),
            "calibrate": ("--input", world["data"], "--student", world["student"], "--teacher",
                          world["teacher"], "--deferral-rate", "0.2")}[command]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli(command, *argv, "--out", out, "--runner", "DirectRunner")
    assert e.value.code == 2 and not out.exists()
    assert "unrecognized arguments: --runner DirectRunner" in capsys.readouterr().err


def test_help_says_training_data_is_read_into_memory(capsys):
    for command in ("distill", "calibrate"):
        with pytest.raises(SystemExit):
            cli(command, "--help")
        assert "read into memory" in " ".join(capsys.readouterr().out.split())
