"""`titans label` against the same job written by hand in one script (issue 19, point 3).

    python benchmarks/label_speed.py [--rows 20000] [--sample-rows 6000] [--runs 5]
                                     [--base-ref REV] [--workdir DIR]

The job: label --rows rows, teacher only, --sample-rows rows for the teacher, at most EPS
(0.01) disagreement with the teacher. Data: ``label_quality.make_tabular``, 16 integer
features (0-15) and 26 classes from scikit-learn's make_classification, the shape of UCI
letter recognition; the teacher (16-320-256-26, standardisation baked in) is trained on labels
of 20,000 other rows. Student budget 0.1 of the teacher's FLOPs.

(h) the hand-written script, one whole process importing only numpy, pyarrow and torch: read
    the Parquet files, draw the sample, run the teacher on it, hold back 2,000 sample rows,
    standardise, distil a 16-HAND_HIDDEN-26 MLP on the teacher's soft labels (100 epochs,
    AdamW, one-cycle), take the max-probability threshold whose disagreement on the held-back
    rows is <= EPS (no guarantee: an empirical threshold), label every row outside the
    sample (the teacher on the rows under the threshold), write Parquet. One torch thread,
    as titans' search uses for steps this small (two threads on a busy 2-core machine made
    the same training many times slower).
(t) `titans label --max-disagreement 0.01` with the same teacher, data and sample size, a
    whole process (`python -m titans.pipeline.cli.main`), the in-process FnApiRunner.
(b) with --base-ref REV, (t) of commit REV (its tree as a git worktree under --workdir,
    first on PYTHONPATH), interleaved too.
Runs are interleaved h, t, (b), h, t, ... so drifting load hits every side alike; medians
with min and max. Quality per side, from the last run: agreement with the teacher over all
rows (the teacher's answers computed here on every row) and the teacher share (rows the
teacher ran on / rows; titans counts its launch checks too), plus titans' own phase times.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import base_titans, timed  # noqa: E402 - same measuring harness

EPS = 0.01
BUDGET = 0.1
HELD = 2_000        # the hand script's threshold rows
HAND_HIDDEN = 223   # the one-hidden-layer width at 0.1 of this teacher's FLOPs (issue: 225)
HAND_EPOCHS = 100


# ----------------------------------------------------------------------------- (h)

def hand(data: str, teacher_path: str, out: str, sample_rows: int, seed: int) -> None:
    """The hand-written job (see the module doc), as one would write it for this data."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(1)  # a tiny MLP: two threads only wait on each other (titans too)
    table = pq.read_table(data)
    n = table.num_rows
    feats = table.column("features").combine_chunks()
    x = feats.flatten().to_numpy().reshape(n, -1).astype(np.float32)
    teacher = torch.jit.load(teacher_path).eval()
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, sample_rows, replace=False)
    with torch.inference_mode():
        p = torch.softmax(teacher(torch.from_numpy(x[sample])), -1)
    held, train = sample[:HELD], sample[HELD:]
    p_held, p_train = p[:HELD].argmax(-1).numpy(), p[HELD:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    torch.manual_seed(seed)
    k = p.shape[1]
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], HAND_HIDDEN), torch.nn.ReLU(),
                                torch.nn.Linear(HAND_HIDDEN, k))
    xt = torch.from_numpy((x[train] - mean) / std)
    batch, steps = 256, -(-len(train) // 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, epochs=HAND_EPOCHS,
                                                steps_per_epoch=steps)
    for _ in range(HAND_EPOCHS):
        perm = torch.randperm(len(train))
        for i in range(0, len(train), batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), p_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()

    def student(rows):
        with torch.inference_mode():
            return torch.softmax(model(torch.from_numpy((x[rows] - mean) / std)), -1).numpy()

    q = student(held)
    conf, wrong = q.max(1), q.argmax(1) != p_held
    order = np.argsort(conf)  # the least confident go to the teacher first
    left = wrong.sum() - np.concatenate([[0], np.cumsum(wrong[order])])
    m = int(np.flatnonzero(left <= EPS * HELD)[0])
    threshold = conf[order[m]] if m < HELD else np.inf
    rest = np.setdiff1d(np.arange(n), sample)
    q = student(rest)
    label, hard = q.argmax(1), q.max(1) < threshold
    with torch.inference_mode():
        label[hard] = teacher(torch.from_numpy(x[rest[hard]])).argmax(-1).numpy()
    ids = table.column("id").to_numpy()
    rows = np.concatenate([sample, rest])
    labels = np.concatenate([p.argmax(-1).numpy(), label])
    source = np.where(np.concatenate([np.ones(len(sample), bool), hard]), "teacher", "student")
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.table({"id": ids[rows], "label": labels, "source": source}),
                   os.path.join(out, "labels.parquet"))
    print(json.dumps({"teacher_rows": int(len(sample) + hard.sum()), "threshold": float(threshold)}))


# ----------------------------------------------------------------------------- measuring

def titans_cmd(data: str, teacher: str, out: str, sample_rows: int, base: list[str] | None) -> list:
    head = (base[:-1] if base else  # base_titans ends with "run"
            [sys.executable, "-m", "titans.pipeline.cli.main", "--log-level", "WARNING"])
    return head + ["label", "--input", data, "--teacher", teacher, "--feature-columns",
                   "features", "--id-column", "id", "--output", out, "--max-disagreement",
                   str(EPS), "--student-budget", str(BUDGET), "--sample-rows", str(sample_rows),
                   "--runner", "FnApiRunner"]


def quality(out: str, teacher_pred, titans: bool) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    if titans:
        t = pq.read_table(os.path.join(out, "labels"), columns=["id", "label"])
        report = json.load(open(os.path.join(out, "report.json")))
        share = report["rows_to_teacher_share"]
        extra = {"student": report["student_arch"],
                 "phases": {k: v["seconds"] for k, v in report["phases"].items()},
                 "search": report["phases"]["distil"].get("search_seconds")}
    else:
        t = pq.read_table(os.path.join(out, "labels.parquet"))
        share = float(np.mean(t.column("source").to_numpy(zero_copy_only=False) == "teacher"))
        extra = {"student": str(HAND_HIDDEN)}
    ids = t.column("id").to_numpy()
    agree = float(np.mean(t.column("label").to_numpy() == teacher_pred[ids]))
    return {"rows": len(ids), "agreement": agree, "teacher_share": share, **extra}


def spread(name: str, seconds: list[float]) -> str:
    return (f"{name:<40} median {statistics.median(seconds):6.2f} s  min {min(seconds):6.2f}  "
            f"max {max(seconds):6.2f}  [{len(seconds)} runs]")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "hand":
        return hand(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000, help="rows to label (default: 20000)")
    ap.add_argument("--sample-rows", type=int, default=6_000,
                    help="rows the teacher labels for training and threshold (default: 6000)")
    ap.add_argument("--runs", type=int, default=5, help="interleaved runs per side (default: 5)")
    ap.add_argument("--seed", type=int, default=0, help="data, teacher and sample seed")
    ap.add_argument("--base-ref", metavar="REV",
                    help="also time `titans label` of this git commit, interleaved")
    ap.add_argument("--workdir", default="benchmarks/out/label_speed", help="data and outputs")
    args = ap.parse_args()
    import label_quality  # torch and scikit-learn: only the parent needs them, for the data

    os.makedirs(args.workdir, exist_ok=True)
    d = os.path.join(args.workdir, f"tabular-{args.rows}-{args.seed}")
    shutil.rmtree(d, ignore_errors=True)
    ds = label_quality.make_tabular(args.rows, args.seed, d)
    base = base_titans(args.base_ref, args.workdir) if args.base_ref else None
    sides = {"(h) hand-written script": lambda out: [
                 sys.executable, os.path.abspath(__file__), "hand", ds["data"], ds["teacher"],
                 out, str(args.sample_rows), str(args.seed)],
             "(t) titans label": lambda out: titans_cmd(ds["data"], ds["teacher"], out,
                                                        args.sample_rows, None)}
    if base:
        sides[f"(b) titans label of {args.base_ref}"] = lambda out: titans_cmd(
            ds["data"], ds["teacher"], out, args.sample_rows, base)
    seconds = {name: [] for name in sides}
    last = {}
    for r in range(args.runs):
        for i, (name, cmd) in enumerate(sides.items()):
            out = os.path.join(d, f"out-{i}")
            shutil.rmtree(out, ignore_errors=True)
            s, _, _ = timed(cmd(out))
            seconds[name].append(s)
            last[name] = quality(out, ds["teacher_pred"], not name.startswith("(h)"))
            print(f"run {r + 1}/{args.runs} {name}: {s:.2f} s", flush=True)
    hand_med = statistics.median(seconds["(h) hand-written script"])
    print(f"\n`titans label` vs the hand-written job: {args.rows:,} rows, {args.sample_rows:,} "
          f"sampled, EPS {EPS}, budget {BUDGET}, whole processes, {args.runs} interleaved runs "
          f"({datetime.date.today()}, {os.cpu_count()} CPU cores)")
    for name, s in seconds.items():
        q = last[name]
        ratio = statistics.median(s) / hand_med
        print(spread(name, s) + f"  {ratio:5.2f}x the hand script  agreement "
              f"{q['agreement']:.2%}  teacher share {q['teacher_share']:.1%}  student {q['student']}")
        if "phases" in q:
            print("    phases (last run, s): " + ", ".join(
                f"{k} {v:.2f}" for k, v in q["phases"].items())
                + ("" if q["search"] is None else f"; student search {q['search']:.2f}"))


if __name__ == "__main__":
    main()
