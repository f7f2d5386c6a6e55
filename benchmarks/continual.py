"""`titans label --state`: does a student that keeps learning across daily runs cut the
teacher's share, with the guarantee re-certified every day, under a stationary stream and
under a shift?

    python benchmarks/continual.py [--rows 12000] [--days 5] [--shift-from 4] [--out DIR]
                                   [--seed 0] [--repeat 1]

Data (scikit-learn's bundled 8x8 digits; nothing is downloaded). The images are split in
seeded halves: the teacher, an MLP(256,256), is trained on augmented copies of the first
half; the second half is dealt into one disjoint group of images per day (no image is shared
between days; stratified by class and by the teacher's confidence, so that every day is the
same mix, see `deal`), and each day's --rows rows are augmented copies of that day's images:
  stationary  moved by -1/0/+1 pixel per axis (p 1/2 per axis), Gaussian pixel noise sd 0.05
  shift       from day --shift-from on, a second stream: moved by up to 2 pixels per axis and
              the ink at 70% (a new scanner), same noise; days before it are the same rows.

Per day, whole `titans label` processes (FnApiRunner, EPS 0.01, delta 0.1, everything else
default), interleaved: without --state (every day a cold start) and with --state (one state
across the days; the shift stream continues the stationary state after the day before
--shift-from). Measured per run:
  teacher share   rows the teacher ran on / rows (sample + hard + audited + launch checks)
  disagreement    share of the rows outside the sample whose label differs from the teacher's
                  (the teacher run here on every row): the guarantee says <= EPS w.p. >= 0.9
  wall            the process's wall time; peak RSS (os.wait4) ; the state's size on disk
With --repeat N each cell runs N times, interleaved (no state, --state, no state, ...; every
--state repeat starts from a copy of the same state, the first one's result goes on to the next
day), repeat r > 0 drawing another sample (--seed S + 1000 r): the wall times are medians with
min-max; the table's shares are the first repeat's, and a line gives each day's median over
the draws, on which the trend from day to day is read (one draw moves a day's share by a few
points). The days are different images, and one day's can be harder for every student than
another's: the last day's rows are also labelled from the state one run older than its own
(the same sample seeds), which measures the last run's learning on the same rows. --seed S draws other data (the teacher's
images, the day groups, the augmentations) and passes --seed S to titans (another sample).
Then the issue's targets, each with its figure: by the last stationary day the share with
--state <= 0.6x (aim 0.3x) the share without it on the same rows; misses of EPS counted
against delta; the shift's drift line on its first day and a falling share the day after;
wall time of day N <= day 1; the state's size bounded by the pool cap.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_digits

EPS, DELTA = 0.01, 0.1
NOISE = 0.05
TEACHER = dict(arch="256,256", epochs=30, lr=1e-3, batch_size=64, weight_decay=1e-4)
LAUNCH = "import sys; from titans.pipeline.cli.main import main; sys.exit(main(sys.argv[1:]))"


# ----------------------------------------------------------------------------- data

def augment(images: np.ndarray, rng: np.random.Generator, reach: int = 1,
            ink: float = 1.0) -> np.ndarray:
    """[n, 8, 8] in [0, 1] -> [n, 64]: moved by up to ``reach`` pixels per axis (p 1/2 per
    axis, zero fill), ink scaled by ``ink``, Gaussian noise (sd NOISE), clipped to [0, 1]."""
    n = len(images)
    pad = np.pad(images, ((0, 0), (reach, reach), (reach, reach)))
    dx = rng.integers(-reach, reach + 1, n) * (rng.random(n) < 0.5)
    dy = rng.integers(-reach, reach + 1, n) * (rng.random(n) < 0.5)
    out = np.empty_like(images)
    for ddy in range(-reach, reach + 1):  # a few vectorised slices, no loop per image
        for ddx in range(-reach, reach + 1):
            m = (dy == ddy) & (dx == ddx)
            out[m] = pad[m, reach + ddy:reach + ddy + 8, reach + ddx:reach + ddx + 8]
    x = ink * out.reshape(n, 64) + rng.normal(0.0, NOISE, (n, 64))
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def make_days(directory: str, rows: int, days: int, shift_from: int, seed: int = 0) -> dict:
    """The teacher (TorchScript) and one Parquet folder per day and stream; per folder the
    teacher's answer for every row (by id)."""
    import torch

    from titans.models.distill import make_student, train_supervised
    from titans.models.forward import forward_in_chunks
    from titans.transforms.io.models import save_torchscript

    from titans.transforms.io.models import load_model_file

    digits = load_digits()
    images, y = digits.images / 16.0, digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    train, held = np.split(perm, [len(y) // 2])
    teacher_path = os.path.join(directory, "teacher.pt")
    made = os.path.join(directory, "days.json")  # --out reused with the same settings: kept
    settings = {"rows": rows, "days": days, "shift_from": shift_from, "seed": seed,
                "split": "stratified"}
    cached = os.path.exists(made) and json.load(open(made)) == settings
    if cached:
        teacher = load_model_file(teacher_path, "cpu")
    else:
        torch.manual_seed(seed)
        teacher = make_student(TEACHER["arch"], 64, 10, "kd", seed=seed)
        train_supervised(teacher, augment(np.tile(images[train], (4, 1, 1)), rng),
                         np.tile(y[train], 4), seed=seed, progress=False,
                         **{k: v for k, v in TEACHER.items() if k != "arch"})
        teacher.eval()
        save_torchscript(teacher, teacher_path, {"arch": TEACHER["arch"]})
    groups = deal(images, y, held, days, teacher, np.random.default_rng([seed, 7]))
    out = {"teacher": teacher_path, "days": {}}
    for d in range(1, days + 1):
        streams = [("stationary", 1, 1.0)] + ([("shift", 2, 0.7)] if d >= shift_from else [])
        for stream, reach, ink in streams:
            g = np.random.default_rng([seed, d, reach])
            pick = g.choice(groups[d - 1], rows)
            x = augment(images[pick], g, reach, ink)
            ids = d * 1_000_000 + np.arange(rows, dtype=np.int64)
            folder = os.path.join(directory, f"{stream}-day{d}")
            os.makedirs(folder, exist_ok=True)
            # the same seeds give the same rows: with a cache only the teacher's answers are
            # computed again, and the files are kept
            for i, part in enumerate([] if cached else np.array_split(np.arange(rows), 4)):
                pq.write_table(pa.table({
                    "id": pa.array(ids[part]),
                    "pixels": pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel()), 64),
                    "y": pa.array(y[pick][part])}), os.path.join(folder, f"part-{i}.parquet"))
            pred = forward_in_chunks(teacher, x, 65536).argmax(-1).numpy()
            out["days"][(stream, d)] = {"data": folder, "first_id": int(ids[0]),
                                        "teacher_pred": pred}
    with open(made, "w") as f:
        json.dump(settings, f)
    return out


def deal(images: np.ndarray, y: np.ndarray, held: np.ndarray, days: int, teacher,
         rng: np.random.Generator) -> list[np.ndarray]:
    """The held-out images dealt to the days as a stratified sample: ordered by class, then by
    the teacher's mean confidence on 16 augmented copies, and each run of ``days`` consecutive
    images shared out one per day in a random order. A day of a real stationary stream is
    thousands of distinct items, and its difficulty hardly moves from one day to the next; a
    day here is ~180 images, and a plain random split made one day measurably harder than
    another for every student (seed 0: yesterday's student agreed with the teacher on 97.3% of
    day 4's rows and 95.1% of day 5's), which read as the student getting worse."""
    from titans.models.forward import forward_in_chunks

    copies = 16
    x = augment(np.repeat(images[held], copies, axis=0), rng)
    p = forward_in_chunks(teacher, x, 65536).softmax(-1).amax(-1).numpy()
    order = np.lexsort((p.reshape(len(held), copies).mean(-1), y[held]))
    groups: list[list[int]] = [[] for _ in range(days)]
    for start in range(0, len(order), days):
        for g, i in zip(rng.permutation(days), order[start:start + days]):
            groups[g].append(int(held[i]))
    return [np.array(g, dtype=np.int64) for g in groups]


# ----------------------------------------------------------------------------- one run

def run(day: dict, teacher: str, out: str, state: str | None, pool_rows: int | None,
        seed: int | None = None) -> dict:
    """One whole `titans label` process; its figures."""
    argv = ["--log-level", "WARNING", "label", "--input", day["data"], "--output", out,
            "--teacher", teacher, "--feature-columns", "pixels", "--id-column", "id",
            "--max-disagreement", str(EPS), "--delta", str(DELTA), "--runner", "FnApiRunner"]
    if seed is not None:  # another sample draw
        argv += ["--seed", str(seed)]
    if state is not None:
        argv += ["--state", state]
        if pool_rows is not None:
            argv += ["--state-pool-rows", str(pool_rows)]
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"titans label failed ({out}):\n{text[-3000:]}")
    report = json.load(open(os.path.join(out, "report.json")))
    labels = pq.read_table(os.path.join(out, "labels"), columns=["id", "label"])
    sample = pq.read_table([os.path.join(out, "labels", f) for f in
                            os.listdir(os.path.join(out, "labels")) if f.startswith("sample-")],
                           columns=["id"]).column("id").to_numpy()
    ids, label = labels.column("id").to_numpy(), labels.column("label").to_numpy()
    outside = ~np.isin(ids, sample)
    truth = day["teacher_pred"][ids[outside] - day["first_id"]]
    st = report.get("state") or {}
    phases = {k: v.get("seconds") for k, v in (report.get("phases") or {}).items()
              if isinstance(v, dict)}
    return {"share": report["rows_to_teacher_share"], "rows": report["rows_in"],
            "phases": phases,
            "teacher_rows": report["rows_to_teacher"], "sample": int(sample.size),
            "hard": report["rows_hard"],
            "disagreement": float(np.mean(label[outside] != truth)),
            "wall": wall, "rss_mb": usage.ru_maxrss / 1024,
            "drift": (st.get("drift") or {}), "kept": (st.get("entry") or {}).get(
                "student", {}).get("kept"),
            "drift_line": next((ln for ln in text.splitlines() if ln.startswith("drift:")), None),
            "state_bytes": dir_bytes(state) if state else None}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# ----------------------------------------------------------------------------- report

def table(results: dict, days: int, shift_from: int) -> str:
    lines = ["| stream | day | teacher share (no state) | teacher share (--state) | ratio | "
             "disagreement outside the sample (no state / --state) | wall s, median (min-max) "
             "(no state / --state) | peak RSS MB (--state) | state MB | student kept | drift |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stream, d in sorted(results, key=lambda k: (k[0] != "stationary", k[1])):
        r = results[(stream, d)]
        a, b = r["plain"], r["state"]
        dr = b["drift"]
        drift = ("" if not dr else
                 f"{'SHIFT' if dr.get('shifted') else 'none'} (agreement {dr['fresh_agreement']:.1%}"
                 + (f", KS p {dr['ks_pvalue']:.2g}" if dr.get("ks_pvalue") is not None else "")
                 + ")")
        lines.append(
            f"| {stream} | {d} | {a['share']:.1%} | {b['share']:.1%} | {b['share'] / a['share']:.2f}x "
            f"| {a['disagreement']:.2%} / {b['disagreement']:.2%} | {spread(a['walls'])} / "
            f"{spread(b['walls'])} "
            f"| {b['rss_mb']:.0f} | {b['state_bytes'] / 1e6:.1f} | {b['kept'] or 'cold'} | {drift} |")
    return "\n".join(lines)


def targets(results: dict, days: int, shift_from: int, runs_total: int) -> list[str]:
    st = {d: results[("stationary", d)] for d in range(1, days + 1)}
    last = st[days]
    ratio = last["state"]["share"] / last["plain"]["share"]
    misses = sum(r[side]["disagreement"] > EPS for r in results.values()
                 for side in ("plain", "state"))
    reps = len(st[1]["state"]["shares"])
    trend = ""  # with other draws the trend is read on their medians (below), not on one draw
    if days > 1 and reps == 1:
        trend = f"; day {days - 1} -> {days}: " + (
            "falling or flat (MET)" if last["state"]["share"] <= st[days - 1]["state"]["share"]
            else "rising (NOT MET)")
    out = [f"stationary day {days}: teacher share with --state {last['state']['share']:.1%} vs "
           f"{last['plain']['share']:.1%} without = {ratio:.2f}x (target <= 0.6x, aim 0.3x): "
           f"{'MET' if ratio <= 0.6 else 'NOT MET'}",
           "shares with --state by day"
           + (" (the first draw)" if reps > 1 else "") + ": "
           + ", ".join(f"{st[d]['state']['share']:.1%}" for d in st) + trend,
           f"disagreement > EPS {EPS} in {misses} of {runs_total} runs (delta {DELTA} allows "
           f"about {DELTA * runs_total:.1f} in expectation)"]
    if reps > 1:  # the same states, other sample draws: medians, and every run's guarantee
        med = {d: float(np.median(st[d]["state"]["shares"])) for d in st}
        plain = float(np.median(last["plain"]["shares"]))
        every = [v for r in results.values() for side in ("plain", "state")
                 for v in r[side]["disagreements"]]
        out.append(f"median share with --state over {reps} sample draws by day: "
                   + ", ".join(f"{med[d]:.1%} ({spread_pct(st[d]['state']['shares'])})"
                               for d in st)
                   + f"; day {days}: {med[days] / plain:.2f}x the median without it; day "
                   f"{days - 1} -> {days}: " + ("falling or flat (MET)" if med[days] <=
                                                 med[days - 1] else "rising (NOT MET)"))
        out.append(f"disagreement > EPS in {sum(v > EPS for v in every)} of {len(every)} runs, "
                   f"every draw counted (delta {DELTA}: about {DELTA * len(every):.1f})")
    walls = [st[d]["state"]["wall"] for d in st]
    reps = len(st[1]["state"]["walls"])
    out.append(f"wall time with --state by day (median of {reps} interleaved run(s), min-max): "
               + ", ".join(spread(st[d]["state"]["walls"]) for d in st)
               + " s; day N <= day 1 (medians): "
               + ("MET" if max(walls[1:]) <= walls[0] else
                  "NOT MET (days " + ", ".join(str(d) for d in list(st)[1:]
                                               if st[d]["state"]["wall"] > walls[0]) + ")"))
    keys = [k for k in ("sample", "teacher labels", "distil", "calibrate", "cascade")
            if k in st[1]["state"]["phase_medians"]]
    for d in st:
        ph = st[d]["state"]["phase_medians"]
        out.append(f"  day {d} --state phases (median s): "
                   + ", ".join(f"{k} {ph.get(k, 0):.2f}" for k in keys)
                   + f"; sum {sum(ph.get(k, 0) for k in keys):.2f}; process wall "
                   f"{st[d]['state']['wall']:.2f} vs no state {st[d]['plain']['wall']:.2f}")
    if ("shift", shift_from) in results:
        s4, s5 = results[("shift", shift_from)]["state"], results.get(("shift", shift_from + 1),
                                                                      {}).get("state")
        out.append(f"shift day {shift_from}: disagreement {s4['disagreement']:.2%} (<= {EPS}: "
                   f"{'held' if s4['disagreement'] <= EPS else 'MISSED'}), drift line "
                   f"{'printed' if s4['drift_line'] else 'MISSING'}, shifted="
                   f"{s4['drift'].get('shifted')}")
        if s5 is not None:
            plain4 = results[("shift", shift_from)]["plain"]["share"]
            plain5 = results[("shift", shift_from + 1)]["plain"]["share"]
            out.append(f"shift day {shift_from + 1} share {s5['share']:.2%} vs day {shift_from} "
                       f"{s4['share']:.2%}: {'falls (MET)' if s5['share'] < s4['share'] else 'NOT MET'}"
                       f" (against no state on the same rows: {s4['share'] / plain4:.2f}x -> "
                       f"{s5['share'] / plain5:.2f}x)")
            if len(s4["shares"]) > 1:  # other draws: the same comparison on their medians
                m4, m5 = float(np.median(s4["shares"])), float(np.median(s5["shares"]))
                out.append(f"shift days {shift_from} -> {shift_from + 1}, median over "
                           f"{len(s4['shares'])} draws: {m4:.1%} ({spread_pct(s4['shares'])}) -> "
                           f"{m5:.1%} ({spread_pct(s5['shares'])}): "
                           + ("falls (MET)" if m5 < m4 else "NOT MET"))
    sizes = [r["state"]["state_bytes"] for r in results.values()]
    rss = [r["state"]["rss_mb"] for r in st.values()]
    out.append(f"state size: at most {max(sizes) / 1e6:.1f} MB (pool capped); peak RSS with "
               f"--state by day: {', '.join(f'{m:.0f}' for m in rss)} MB")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=12_000, help="rows per day (default: %(default)s)")
    ap.add_argument("--days", type=int, default=5, help="days (default: %(default)s)")
    ap.add_argument("--shift-from", type=int, default=4,
                    help="first day of the shift stream; > --days: none (default: %(default)s)")
    ap.add_argument("--pool-rows", type=int, default=None,
                    help="--state-pool-rows (default: titans' default)")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--cold-seeds", type=int, default=0, metavar="N",
                    help="instead of the schedule: cold runs (no --state) with --seed 1..N on "
                         "the first two stationary days, counting the runs whose disagreement "
                         "outside the sample is over EPS (the guarantee allows a share DELTA); "
                         "the schedule's runs all draw with one seed, so they are one draw")
    ap.add_argument("--seed", type=int, default=0,
                    help="data seed (the teacher's images, the day groups, the augmentations), "
                         "also passed to titans as --seed when not 0 (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="runs per cell and side, interleaved; wall times as medians with "
                         "min-max (default: %(default)s)")
    a = ap.parse_args()
    if a.repeat < 1:
        ap.error("--repeat must be 1 or more")
    work = a.out or tempfile.mkdtemp(prefix="titans-continual-")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    data = make_days(work, a.rows, a.days, a.shift_from, a.seed)
    for name in os.listdir(work):  # a reused --out: the previous runs' outputs and states go
        if name.startswith(("out-", "state-")) and os.path.isdir(os.path.join(work, name)):
            shutil.rmtree(os.path.join(work, name))
    print(f"data: {a.days} days x {a.rows:,} rows in {work} ({time.time() - t0:.0f} s)", flush=True)
    if a.cold_seeds:
        return cold_seeds(data, work, a.cold_seeds)
    results: dict = {}
    state = os.path.join(work, "state-stationary")
    seed = a.seed or None
    older = os.path.join(work, "state-stationary-older")  # the state before the day before last
    for d in range(1, a.days + 1):
        if d == a.shift_from:  # the shift stream goes on from the state before its first day
            shutil.copytree(state, os.path.join(work, "state-shift"))
        if d == a.days - 1 and d > 1:
            shutil.copytree(state, older)
        for stream in ("stationary", "shift"):
            if (stream, d) not in data["days"]:
                continue
            day = data["days"][(stream, d)]
            st = state if stream == "stationary" else os.path.join(work, "state-shift")
            cell = repeated(day, data["teacher"], os.path.join(work, f"out-{stream}-{d}"), st,
                            a.pool_rows, seed, a.repeat)
            results[(stream, d)] = cell
            plain, with_state = cell["plain"], cell["state"]
            print(f"{stream} day {d}: share {plain['share']:.1%} -> {with_state['share']:.1%} "
                  f"with --state, disagreement {plain['disagreement']:.2%} / "
                  f"{with_state['disagreement']:.2%}, wall {spread(plain['walls'])} / "
                  f"{spread(with_state['walls'])} s"
                  + (f"; {with_state['drift_line']}" if with_state["drift_line"] else ""),
                  flush=True)
    learning = None
    if os.path.exists(older):
        learning = same_rows(data["days"][("stationary", a.days)], data["teacher"], work, older,
                             a.pool_rows, seed, a.repeat)
        shutil.rmtree(older)
    print()
    print(table(results, a.days, a.shift_from))
    print()
    for line in targets(results, a.days, a.shift_from, 2 * len(results)):
        print(line)
    if learning is not None:
        print(learning_line(results, learning, a.days))
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({f"{s}-{d}": r for (s, d), r in results.items()}, f, indent=1, default=float)
    return 0


def repeated(day: dict, teacher: str, out: str, state: str, pool_rows: int | None,
             seed: int | None, repeat: int) -> dict:
    """One cell: ``repeat`` runs per side, interleaved (no state, then --state, ...). Every
    --state repeat starts from a copy of the state as it was before the cell; the first one's
    run writes the real state (it goes on to the next day). Figures of the first repeat, with
    the wall times (and phase times) of all."""
    before = state + ".before"
    if repeat > 1:
        if os.path.exists(before):
            shutil.rmtree(before)
        shutil.copytree(state, before) if os.path.exists(state) else os.makedirs(before)
    sides: dict = {"plain": [], "state": []}
    for r in range(repeat):
        # a repeat draws another sample (--seed): a day's share varies with the draw, and the
        # median over the draws is what the trend across days is read on
        seed_r = seed if r == 0 else (seed or 0) + 1000 * r
        sides["plain"].append(run(day, teacher, f"{out}-plain" + (f"-r{r}" if r else ""), None,
                                  None, seed_r))
        st = state
        if r:  # a copy of the state before the cell: the same warm start as repeat 0
            st = f"{state}.r{r}"
            shutil.copytree(before, st)
        sides["state"].append(run(day, teacher, f"{out}-state" + (f"-r{r}" if r else ""), st,
                                  pool_rows, seed_r))
        if r:
            shutil.rmtree(st)
            for side in ("plain", "state"):
                shutil.rmtree(f"{out}-{side}-r{r}")
    if repeat > 1:
        shutil.rmtree(before)
    cell = {}
    for side, runs in sides.items():
        first = dict(runs[0])
        first["walls"] = [x["wall"] for x in runs]
        first["shares"] = [x["share"] for x in runs]
        first["disagreements"] = [x["disagreement"] for x in runs]
        first["wall"] = float(np.median(first["walls"]))
        first["phase_medians"] = {k: float(np.median([x["phases"].get(k) or 0.0 for x in runs]))
                                  for k in runs[0]["phases"]}
        cell[side] = first
    return cell


def same_rows(day: dict, teacher: str, work: str, older: str, pool_rows: int | None,
              seed: int | None, repeat: int) -> list[float]:
    """The last day's rows labelled from the state one run older than its own (the state
    before the day before), with the cell's sample seeds: its shares. Beside the last day's
    own shares this is the learning of the last run on the same rows: the days are different
    images, and one day's rows can be harder than another's for every student."""
    shares = []
    for r in range(repeat):
        st = os.path.join(work, f"state-older-r{r}")
        shutil.copytree(older, st)
        out = os.path.join(work, f"out-older-r{r}")
        shares.append(run(day, teacher, out, st, pool_rows,
                          seed if r == 0 else (seed or 0) + 1000 * r)["share"])
        shutil.rmtree(st)
        shutil.rmtree(out)
    return shares


def learning_line(results: dict, older: list[float], days: int) -> str:
    new = results[("stationary", days)]["state"]["shares"]
    a, b = float(np.median(older)), float(np.median(new))
    return (f"day {days}'s rows, the same {len(new)} sample seed(s), from the state before run "
            f"{days - 1} vs before run {days}: median teacher share {a:.1%} ({spread_pct(older)}) "
            f"-> {b:.1%} ({spread_pct(new)}): "
            + ("falling or flat on the same rows (MET)" if b <= a else "rising (NOT MET)"))


def spread_pct(values: list[float]) -> str:
    """min-max of shares, as percentages."""
    return f"{min(values):.1%}-{max(values):.1%}"


def spread(values: list[float]) -> str:
    """median (min-max) of a list of seconds; one value alone."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def cold_seeds(data: dict, work: str, seeds: int) -> int:
    """Cold runs at seeds 1..N on stationary days 1-2: how often the guarantee is missed."""
    over = []
    for seed in range(1, seeds + 1):
        for d in (1, 2):
            out = os.path.join(work, f"out-cold-{d}-{seed}")
            r = run(data["days"][("stationary", d)], data["teacher"], out, None, None, seed)
            shutil.rmtree(out)
            over.append(r["disagreement"] > EPS)
            print(f"day {d} seed {seed}: disagreement {r['disagreement']:.2%}, teacher share "
                  f"{r['share']:.1%}", flush=True)
    print(f"over EPS {EPS:g}: {sum(over)} of {len(over)} runs (DELTA {DELTA:g} allows about "
          f"{DELTA * len(over):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
