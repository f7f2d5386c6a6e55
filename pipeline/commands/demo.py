"""`titans demo`: the whole story on real data in well under a minute on a CPU.

scikit-learn's bundled handwritten digits (8x8 images, 10 classes) are split into
train/test Parquet files; a large teacher MLP is trained on the labels, a small student
is distilled from it, both are saved as TorchScript, and the same cascade as
`titans run` labels the test split. The summary compares teacher, student and cascade.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from titans.models.calibration import cascade_curve
from titans.models.deferral import make_rule
from titans.models.distill import distill, make_student, train_supervised
from titans.models.forward import forward_in_chunks
from titans.models.loading import count_parameters
from titans.pipeline import defaults
from titans.transforms.features import FeatureSpec, feature_matrix
from titans.transforms.io.models import save_plot, save_torchscript

_LOG = logging.getLogger("titans")

STUDENT_ARCH, TEACHER_ARCH = "16", "256,256"
RULE = defaults.RULE  # the rule `titans run` uses when none is given


def digits_tables(seed: int) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(train, calibration, test) tables, 60/15/25%: id, pixels (fixed-size list of 64 floats
    in [0, 1]), y. The calibration split is for `titans calibrate` (see README)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    ids = np.arange(len(x))
    rest, te = train_test_split(ids, test_size=0.25, random_state=seed, stratify=digits.target)
    tr, cal = train_test_split(rest, test_size=0.2, random_state=seed,
                               stratify=digits.target[rest])

    def table(idx):
        return pa.table({"id": pa.array(idx, pa.int64()),
                         "pixels": pa.FixedSizeListArray.from_arrays(pa.array(x[idx].ravel()), 64),
                         "y": pa.array(digits.target[idx], pa.int64())})
    return table(np.sort(tr)), table(np.sort(cal)), table(np.sort(te))


def matrix(table: pa.Table) -> np.ndarray:
    return feature_matrix(table, FeatureSpec(("pixels",), 64, vector=True))[0]


def train_models(train: pa.Table, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    x, y = matrix(train), train.column("y").to_numpy()
    teacher = make_student(TEACHER_ARCH, 64, 10, "kd", seed=seed)
    train_supervised(teacher, x, y, epochs=40, lr=1e-3, batch_size=64, seed=seed, progress=False)
    teacher.eval()
    teacher_probs = torch.softmax(forward_in_chunks(teacher, x, defaults.BATCH_SIZE), -1).numpy()
    student = make_student(STUDENT_ARCH, 64, 10, "kd", seed=seed)
    distill(student, x, teacher_probs, labels=y, method="kd", epochs=40, lr=1e-2, batch_size=64,
            seed=seed, progress=False)
    return student.eval(), teacher


def run_demo(output: str, deferral_rate: float, seed: int, beam_args: list[str],
             fmt: str = "parquet") -> dict:
    from titans.pipeline.job import job_checks, run_cascade
    from titans.pipeline.plan import RunConfig, plan_run
    from titans.models.loading import ModelRef

    start = time.time()
    if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
        beam_args = ["--runner", "FnApiRunner"] + beam_args  # in-process; no Prism download
    job_checks(beam_args, {})  # the runner and its options, before a previous demo is removed
    _prepare(output)
    data, models, run_dir = (os.path.join(output, d) for d in ("data", "models", "run"))
    os.makedirs(os.path.join(data, "test"))
    os.makedirs(models)

    train, calibration, test = digits_tables(seed)
    write = pq.write_table
    if fmt == "tfrecord":  # tf.train.Example: id and y int64_list, pixels float_list
        from titans.transforms.io.tfrecord import write_table as write
    suffix = ".parquet" if fmt == "parquet" else ".tfrecord"
    write(train, os.path.join(data, "train" + suffix))
    write(calibration, os.path.join(data, "calibration" + suffix))
    write(test, os.path.join(data, "test", "part-0" + suffix))
    print(f"data: {train.num_rows} train / {calibration.num_rows} calibration / {test.num_rows} "
          f"test rows of scikit-learn's digits as {fmt} -> {data}/")

    logging.getLogger("titans.models.distill").setLevel(logging.WARNING)  # no per-epoch lines
    student, teacher = train_models(train, seed)
    student_path, teacher_path = (os.path.join(models, f) for f in ("student.pt", "teacher.pt"))
    save_torchscript(student, student_path, {"arch": STUDENT_ARCH, "method": "kd"})
    save_torchscript(teacher, teacher_path, {"arch": TEACHER_ARCH})
    sp, tp = count_parameters(student), count_parameters(teacher)
    print(f"models: student MLP 64-{STUDENT_ARCH}-10 ({sp:,} parameters), teacher MLP "
          f"64-{TEACHER_ARCH}-10 ({tp:,} parameters, {tp / sp:.0f}x) trained in "
          f"{time.time() - start:.1f} s -> {models}/")

    config = RunConfig(input=os.path.join(data, "test"), output=run_dir,
                       student=ModelRef(student_path), teacher=ModelRef(teacher_path),
                       feature_columns=("pixels",), id_column="id", rule=RULE,
                       deferral_rate=deferral_rate, seed=seed)
    report = run_cascade(plan_run(config), beam_args)

    labels = pq.read_table(os.path.join(run_dir, "labels")).sort_by("id")
    y = test.column("y").to_numpy()
    x = matrix(test)
    s_logits = forward_in_chunks(student, x, defaults.BATCH_SIZE)
    t_pred = forward_in_chunks(teacher, x, defaults.BATCH_SIZE).argmax(-1).numpy()
    s_pred = s_logits.argmax(-1).numpy()
    summary = {
        "teacher_accuracy": float((t_pred == y).mean()),
        "student_accuracy": float((s_pred == y).mean()),
        "cascade_accuracy": float((labels.column("label").to_numpy() == y).mean()),
        "deferral_rate": report["deferral_rate"],
        "teacher_rows_avoided": report["teacher_rows_avoided"],
        "teacher_rows_avoided_share": report["teacher_rows_avoided_share"],
        "teacher_compute_avoided_share": report["teacher_compute_avoided_share"],
        "rows": report["rows_in"], "rule": RULE, "threshold": report["threshold"],
    }
    summary["meets_target"] = (summary["cascade_accuracy"] >= summary["teacher_accuracy"] - 0.01
                               and summary["deferral_rate"] <= 0.30)
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    _, s_score = make_rule(RULE)(s_logits)
    curve = cascade_curve(s_score.numpy(), s_pred, t_pred, labels=y)
    plot_path = os.path.join(output, "accuracy_vs_deferral.png")
    save_plot(plot_path, {RULE: curve},
              operating_point=(summary["deferral_rate"], summary["cascade_accuracy"], "this run"),
              teacher_accuracy=summary["teacher_accuracy"],
              student_accuracy=summary["student_accuracy"],
              title="titans demo: digits test split")

    print()
    print(f"teacher accuracy : {summary['teacher_accuracy']:.2%}  (teacher on every row)")
    print(f"student accuracy : {summary['student_accuracy']:.2%}  (student on every row)")
    print(f"cascade accuracy : {summary['cascade_accuracy']:.2%}  (student on easy rows, "
          f"teacher on hard rows)")
    print(f"deferral rate    : {summary['deferral_rate']:.1%} of {summary['rows']} rows sent to "
          f"the teacher ({RULE} rule)")
    print(f"teacher calls saved: {summary['teacher_rows_avoided']} rows "
          f"({summary['teacher_rows_avoided_share']:.1%}), teacher compute saved "
          f"{summary['teacher_compute_avoided_share']:.1%}")
    print(f"target (cascade >= teacher - 1 point at <= 30% deferral): "
          f"{'met' if summary['meets_target'] else 'NOT met'}")
    print(f"outputs: {run_dir}/labels/, {run_dir}/report.json, {plot_path}, "
          f"{os.path.join(output, 'summary.json')}  ({time.time() - start:.1f} s in all)")
    return summary


def _prepare(output: str) -> None:
    """Start from an empty directory; only a previous demo's directory is replaced."""
    if os.path.exists(output) and os.listdir(output):
        if not os.path.exists(os.path.join(output, "summary.json")) and \
                not os.path.exists(os.path.join(output, "models")):
            raise ValueError(f"{output!r} is not empty and does not hold a previous demo; "
                             f"pass another --output")
        shutil.rmtree(output)
    os.makedirs(output, exist_ok=True)
