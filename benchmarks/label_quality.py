"""`titans label` end to end on data that ships offline: does the whole command keep its
guarantee, and how many rows still reach the teacher?

    python benchmarks/label_quality.py [--rows 20000] [--sample-rows 6000] [--seeds 1]
                                       [--big-rows 1000000] [--out DIR]

Data (scikit-learn's bundled 8x8 digits; nothing is downloaded). The images are split in two
seeded halves: the teacher, an MLP(256,256), is trained on labels of augmented copies of the
first half (4 per image); the unlabeled dataset to label is made of augmented copies of the
second half only, so the teacher never saw an image it labels. Augmentation as in
cascade_quality.py, plus a little pixel noise so that copies of an image are distinct rows:
  digits          Gaussian pixel noise (sd 0.05, clipped to [0, 1])
  digits-shifted  every image moved by -1/0/+1 pixel along each axis with probability 1/2 per
                  axis (zero fill), then the same noise: a linear student cannot model
                  translation, the teacher can, so there is a real gap to cascade over.

For each dataset, seed, student budget F in {0.02, 0.1, 0.25} and EPS in {0.005, 0.01, 0.02}
(delta 0.1, default audit rate 0.01), `titans label` runs in this process on --rows rows with
--sample-rows rows for the teacher. One output directory per (dataset, seed) is reused with
--resume, so the sample and its teacher labels are made once and every other setting
redoes only the student, the calibration and the cascade (that is what --resume is for).
Measured per run:
  disagreement   share of the rows outside the sample whose label differs from the teacher's
                 (the teacher's answers computed here, on every row) -- the guarantee says
                 <= EPS with probability >= 0.9
  to teacher     share of all rows the teacher ran on: sample + hard + audited
  hard           share of the rows outside the sample the cascade sent to the teacher
  saved          teacher compute saved against labeling every row with the teacher (FLOPs)
  accuracy       the labels against the true digits, next to the teacher's own accuracy
Then one run on --big-rows rows of digits-shifted (EPS 0.01, F 0.1, default --sample-rows),
where the sample is a small share of the rows and the teacher share approaches the hard share.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn.datasets import load_digits

from titans.models.distill import make_student, train_supervised
from titans.models.forward import forward_in_chunks
from titans.transforms.io.models import save_torchscript
from titans.pipeline.cli.main import main as titans

EPS = (0.005, 0.01, 0.02)
BUDGETS = (0.02, 0.1, 0.25)
DELTA = 0.1
NOISE = 0.05
TEACHER = dict(arch="256,256", epochs=30, lr=1e-3, batch_size=64, weight_decay=1e-4)


# ----------------------------------------------------------------------------- data

def augment(images: np.ndarray, rng: np.random.Generator, shift: bool) -> np.ndarray:
    """[n, 8, 8] in [0, 1] -> [n, 64]: shifted by up to one pixel per axis (p 1/2 each) if
    ``shift``, plus Gaussian noise (sd NOISE), clipped to [0, 1]."""
    n = len(images)
    if shift:
        pad = np.pad(images, ((0, 0), (1, 1), (1, 1)))
        dx = rng.integers(-1, 2, n) * (rng.random(n) < 0.5)
        dy = rng.integers(-1, 2, n) * (rng.random(n) < 0.5)
        out = np.empty_like(images)
        for ddy in (-1, 0, 1):  # 9 vectorised slices instead of a Python loop per image
            for ddx in (-1, 0, 1):
                m = (dy == ddy) & (dx == ddx)
                out[m] = pad[m, 1 + ddy:9 + ddy, 1 + ddx:9 + ddx]
        images = out
    x = images.reshape(n, 64) + rng.normal(0.0, NOISE, (n, 64))
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def make_dataset(name: str, rows: int, seed: int, directory: str, files: int = 4) -> dict:
    """Train the teacher on the first half of the images; write ``rows`` augmented copies of
    the second half as ``files`` Parquet files (id, pixels, y). Returns the teacher path and,
    for every row, its true label and the teacher's answer."""
    digits = load_digits()
    images, y = digits.images / 16.0, digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    train, held = np.split(perm, [len(y) // 2])
    shift = name == "digits-shifted"
    x_train = augment(np.tile(images[train], (4, 1, 1)), rng, shift)
    teacher = make_student(TEACHER["arch"], 64, 10, "kd", seed=seed)
    train_supervised(teacher, x_train, np.tile(y[train], 4), seed=seed, progress=False,
                     **{k: v for k, v in TEACHER.items() if k != "arch"})
    teacher.eval()
    os.makedirs(os.path.join(directory, "data"), exist_ok=True)
    teacher_path = os.path.join(directory, "teacher.pt")
    save_torchscript(teacher, teacher_path, {"arch": TEACHER["arch"]})

    pick = np.random.default_rng([seed, 1]).choice(held, rows)  # copies of held-out images
    x = augment(images[pick], np.random.default_rng([seed, 2]), shift)
    labels = y[pick]
    teacher_pred = forward_in_chunks(teacher, x, 65536).argmax(-1).numpy()
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        pq.write_table(pa.table({
            "id": pa.array(part, pa.int64()),
            "pixels": pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel()), 64),
            "y": pa.array(labels[part], pa.int64())}),
            os.path.join(directory, "data", f"part-{i}.parquet"))
    return {"teacher": teacher_path, "data": os.path.join(directory, "data"), "y": labels,
            "teacher_pred": teacher_pred, "column": "pixels"}


TABULAR = dict(features=16, classes=26, teacher_rows=20_000, arch="320,256")


def make_tabular(rows: int, seed: int, directory: str, files: int = 4) -> dict:
    """The 16-feature, 26-class job of label_speed.py (issue 19's shape, like UCI's letter
    recognition data): scikit-learn's ``make_classification`` (2 clusters per class, 12
    informative features, a little label noise), each feature then stored as UCI letter's
    are: integers 0 to 15 (here round(2 x + 7.5), clipped). The teacher, standardisation baked in (``build_student``) and 320-256 wide,
    is trained on labels of TABULAR["teacher_rows"] rows drawn apart from the ``rows`` to
    label. Same return value as ``make_dataset`` (column "features")."""
    from sklearn.datasets import make_classification

    from titans.models.distill import build_student, feature_stats

    d, k, n_teacher = TABULAR["features"], TABULAR["classes"], TABULAR["teacher_rows"]
    x, y = make_classification(n_samples=n_teacher + rows, n_features=d, n_informative=12,
                               n_redundant=2, n_classes=k, n_clusters_per_class=2,
                               class_sep=3.0, flip_y=0.02, random_state=seed)
    x = np.clip(np.round(2.0 * x + 7.5), 0, 15).astype(np.float32)
    y = y.astype(np.int64)
    teacher = build_student(TABULAR["arch"], d, k, *feature_stats(x[:n_teacher]), seed=seed)
    train_supervised(teacher, x[:n_teacher], y[:n_teacher], seed=seed, progress=False,
                     epochs=20, lr=1e-3, batch_size=128, weight_decay=1e-4)
    teacher.eval()
    os.makedirs(os.path.join(directory, "data"), exist_ok=True)
    teacher_path = os.path.join(directory, "teacher.pt")
    save_torchscript(teacher, teacher_path, {"arch": TABULAR["arch"]})
    x, labels = x[n_teacher:], y[n_teacher:]
    teacher_pred = forward_in_chunks(teacher, x, 65536).argmax(-1).numpy()
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        pq.write_table(pa.table({
            "id": pa.array(part, pa.int64()),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel()), d),
            "y": pa.array(labels[part], pa.int64())}),
            os.path.join(directory, "data", f"part-{i}.parquet"))
    return {"teacher": teacher_path, "data": os.path.join(directory, "data"), "y": labels,
            "teacher_pred": teacher_pred, "column": "features"}


# ----------------------------------------------------------------------------- one run

def run_label(ds: dict, out: str, eps: float, budget: float, seed: int,
              sample_rows: int | None, resume: bool, log) -> dict:
    argv = ["--log-level", "WARNING", "label", "--input", ds["data"], "--teacher", ds["teacher"],
            "--feature-columns", ds["column"], "--id-column", "id", "--output", out,
            "--max-disagreement", str(eps), "--delta", str(DELTA),
            "--student-budget", str(budget), "--seed", str(seed), "--runner", "FnApiRunner"]
    if sample_rows:
        argv += ["--sample-rows", str(sample_rows)]
    if resume:
        argv.append("--resume")
    t0 = time.time()
    with contextlib.redirect_stdout(log):
        code = titans(argv)
    wall = time.time() - t0
    if code != 0:
        raise RuntimeError(f"titans label exited {code}; see the log")
    report = json.load(open(os.path.join(out, "report.json")))
    labels = pq.read_table(os.path.join(out, "labels"), columns=["id", "label", "source"])
    ids = labels.column("id").to_numpy()
    label = labels.column("label").to_numpy()
    in_sample = np.zeros(len(ds["y"]), bool)
    sample_files = [p for p in os.listdir(os.path.join(out, "labels")) if p.startswith("sample-")]
    for f in sample_files:
        in_sample[pq.read_table(os.path.join(out, "labels", f), columns=["id"])
                  .column("id").to_numpy()] = True
    outside = ~in_sample[ids]
    return {
        "eps": eps, "budget": budget, "seed": seed, "rows": report["rows_in"],
        "sample": report["rows_prelabeled"],
        "disagreement": float(np.mean(label[outside] != ds["teacher_pred"][ids[outside]])),
        "to_teacher": report["rows_to_teacher_share"],
        "hard": report["rows_hard"] / max(1, report["rows_cascade_in"]),
        "saved": report["teacher_compute_saved_share_job"],
        "accuracy": float(np.mean(label == ds["y"][ids])),
        "teacher_accuracy": float(np.mean(ds["teacher_pred"] == ds["y"])),
        "student": report["student_arch"], "rule": report["rule"],
        "student_flops": report["student_size_vs_teacher"]["flops"],
        "certified": report["certified"], "audit": report.get("audit_disagreement_estimate"),
        "wall": wall,
    }


def table(rows: list[dict]) -> str:
    lines = ["| dataset | F | EPS | student (FLOPs share) | rule | disagreement outside sample "
             "| <= EPS | to teacher (sample+hard+audit) | hard (outside sample) | compute saved "
             "| accuracy (teacher) | s |",
             "|---|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['budget']} | {r['eps']} | {r['student']} "
            f"({r['student_flops']:.3f}) | {r['rule']} | {r['disagreement']:.4f} | "
            f"{'yes' if r['disagreement'] <= r['eps'] else 'NO'} | {r['to_teacher']:.3f} | "
            f"{r['hard']:.3f} | {r['saved']:.3f} | {r['accuracy']:.4f} "
            f"({r['teacher_accuracy']:.4f}) | {r['wall']:.0f} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Mean over seeds per (dataset, F, EPS); the worst disagreement and how many draws
    exceeded EPS (the guarantee allows delta = 10% of draws)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["budget"], r["eps"]), []).append(r)
    lines = ["| dataset | F | EPS | students chosen | disagreement outside sample: mean (max) "
             "| draws > EPS | to teacher | hard (outside sample) | compute saved |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for (name, budget, eps), rs in groups.items():
        dis = [r["disagreement"] for r in rs]
        archs = ", ".join(sorted({r["student"] for r in rs}))
        lines.append(
            f"| {name} | {budget} | {eps} | {archs} | {np.mean(dis):.4f} ({max(dis):.4f}) | "
            f"{sum(d > eps for d in dis)}/{len(rs)} | "
            f"{np.mean([r['to_teacher'] for r in rs]):.3f} | "
            f"{np.mean([r['hard'] for r in rs]):.3f} | {np.mean([r['saved'] for r in rs]):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000, help="rows of each grid dataset (default: 20000)")
    ap.add_argument("--sample-rows", type=int, default=6_000,
                    help="--sample-rows of the grid runs (default: 6000)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per grid cell (default: 1)")
    ap.add_argument("--datasets", default="digits-shifted,digits",
                    help="comma-separated, from digits-shifted, digits, tabular (the 16-feature "
                         "26-class job of label_speed.py) (default: digits-shifted,digits)")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                    help="student budgets F (default: %(default)s)")
    ap.add_argument("--eps", default=",".join(map(str, EPS)), help="EPS values (default: %(default)s)")
    ap.add_argument("--big-rows", type=int, default=1_000_000,
                    help="rows of the scale run on digits-shifted; 0 skips it (default: 1000000)")
    ap.add_argument("--big-sample-rows", default="",
                    help="comma-separated --sample-rows of the scale runs, one run each on the "
                         "same data; empty = titans label's default (default: empty)")
    ap.add_argument("--work", help="directory for data and outputs (default: a temporary one)")
    ap.add_argument("--out", help="directory to write label_quality.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: threads cost more than they give on a small machine
    work = args.work or tempfile.mkdtemp(prefix="titans-label-quality-")
    log = open(os.path.join(work, "titans-label.log"), "a")
    start = time.time()
    rows = []
    budgets = [float(b) for b in args.budgets.split(",")]
    epss = [float(e) for e in args.eps.split(",")]
    for name in [n for n in args.datasets.split(",") if n]:
        for seed in range(args.seeds):
            d = os.path.join(work, f"{name}-{args.rows}-{seed}")
            shutil.rmtree(d, ignore_errors=True)
            ds = (make_tabular(args.rows, seed, d) if name == "tabular" else
                  make_dataset(name, args.rows, seed, d))
            out, first = os.path.join(d, "out"), True
            for budget in budgets:
                for eps in epss:
                    r = run_label(ds, out, eps, budget, seed, args.sample_rows, not first, log)
                    first = False
                    r["dataset"] = name
                    rows.append(r)
                    print(table([r]).splitlines()[-1], flush=True)
    sections = [f"## Grid: {args.rows:,} rows, --sample-rows {args.sample_rows:,}, delta {DELTA}, "
                f"{args.seeds} seed(s); mean over seeds\n", summary(rows),
                "\nEvery run:\n", table(rows)] if rows else []
    if args.big_rows:
        d = os.path.join(work, f"digits-shifted-{args.big_rows}")
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.time()
        ds = make_dataset("digits-shifted", args.big_rows, 0, d, files=8)
        print(f"[scale] {args.big_rows:,} rows written in {time.time() - t0:.0f} s", flush=True)
        big = []
        for n in [int(v) if v else None for v in args.big_sample_rows.split(",")]:
            out = os.path.join(d, "out")
            shutil.rmtree(out, ignore_errors=True)
            r = run_label(ds, out, 0.01, 0.1, 0, n, False, log)
            r["dataset"] = f"digits-shifted {args.big_rows:,}, sample {r['sample']:,}"
            print(table([r]).splitlines()[-1], flush=True)
            big.append(r)
        sections += [f"\n## Scale: {args.big_rows:,} rows of digits-shifted, EPS 0.01, F 0.1\n",
                     table(big), ""]
        for r in big:
            share = r["sample"] / r["rows"]
            sections.append(f"- sample {r['sample']:,}: teacher share {r['to_teacher']:.3f} = "
                            f"sample {share:.3f} + hard {r['hard']:.3f} x {1 - share:.3f} + audits "
                            f"(the hard share alone: {r['hard']:.3f})")
    footer = (f"\n{datetime.date.today()}: {time.time() - start:.0f} s on {os.cpu_count()} CPU "
              f"cores (torch threads = 1); command: python benchmarks/label_quality.py "
              + " ".join(sys.argv[1:] if argv is None else argv))
    text = "\n".join(sections) + "\n" + footer
    with open(os.path.join(work, "label_quality.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    print("\n" + text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "label_quality.md"), "w") as f:
            f.write("# titans label quality\n\n" + text + "\n")


if __name__ == "__main__":
    main()
