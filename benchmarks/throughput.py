"""Throughput of `titans run` against baselines measured in the same run, on a noisy machine.

    python benchmarks/throughput.py [--rows 1000000] [--memory-rows 4000000] [--repeat 5]

For two model pairs (small: student MLP 64-32-10, teacher 64-256-256-10; large: student
64-128-10, teacher 64-512-512-10), on N rows x 64 float32 in one Parquet file with pyarrow's
default 1M-row groups:
(a) a hand-written pyarrow + torch loop doing the same cascade (student on all rows, margin
    rule at deferral rate 0.2 from the exact quantile, teacher on the hard rows, Parquet out);
(b) `titans run --deferral-rate 0.2` with the same models and data, default runner;
(c) stock Beam: ReadFromParquet -> one tensor per row -> RunInference(PytorchModelHandlerTensor),
    student only (small pair), on --stock-rows rows and a quarter of them;
(d) the compute alone: student on every row and teacher on the hard 20%, tensors already in
    memory, same threads, in a fresh process: the physical limit of (b)'s marginal rate.
With --base-ref REV, (b) of commit REV (a git worktree under --workdir) runs interleaved with
(b) too, and its ratio to (b) is printed: a change's "no slowdown" check, measured in one run.
(a), (b) and (c) are whole processes (importing Beam and torch is part of the cost). Runs of
each comparison are interleaved (a, b, b0, then b, b0, a, ...: the order rotates, and the page
cache is flushed before each run) so drifting load hits all sides alike;
the medians are compared and the minimum and maximum printed with them. Marginal rows/s
(start-up excluded) come from the medians at --rows and --memory-rows.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

DIM, CLASSES, RATE = 64, 10, 0.2
PAIRS = {"small": ((32,), (256, 256)), "large": ((128,), (512, 512))}


def make_data(path: str, rows: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.exists(path):
        return
    rng = np.random.default_rng(seed)
    writer = None
    chunk = 1_000_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        x = rng.normal(size=n * DIM).astype(np.float32)
        table = pa.table({"id": pa.array(np.arange(start, start + n)),
                          "features": pa.FixedSizeListArray.from_arrays(pa.array(x), DIM)})
        writer = writer or pq.ParquetWriter(path + ".tmp", table.schema)
        # pyarrow's default row group (1M rows): the layout real files have
        writer.write_table(table, row_group_size=1_000_000)
    writer.close()
    os.rename(path + ".tmp", path)


def make_models(directory: str, pair: str = "small") -> tuple[str, str]:
    import torch

    from titans.models.architectures import MLP
    from titans.transforms.io.models import save_torchscript

    student_hidden, teacher_hidden = PAIRS[pair]
    suffix = "" if pair == "small" else f"-{pair}"
    paths = (os.path.join(directory, f"student{suffix}.pt"),
             os.path.join(directory, f"teacher{suffix}.pt"))
    if not all(os.path.exists(p) for p in paths):
        torch.manual_seed(0)
        save_torchscript(MLP(DIM, CLASSES, student_hidden), paths[0])
        save_torchscript(MLP(DIM, CLASSES, teacher_hidden), paths[1])
    return paths


def handwritten(data: str, student: str, teacher: str, out: str, batch: int = 65536) -> None:
    """(a): the loop a careful engineer would write by hand, one pass over the file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    s, t = torch.jit.load(student), torch.jit.load(teacher)
    batches, outs = [], []
    warnings.simplefilter("ignore", UserWarning)  # zero-copy from Arrow: read-only, only read
    with torch.inference_mode():
        for rb in pq.ParquetFile(data).iter_batches(batch_size=batch):
            x = torch.from_numpy(rb.column("features").flatten().to_numpy().reshape(-1, DIM))
            p = torch.softmax(s(x), -1)
            top2 = p.topk(2, -1).values
            outs.append((p.max(-1), 1 - (top2[:, 0] - top2[:, 1]), x))
            batches.append(rb)
        threshold = np.quantile(torch.cat([o[1] for o in outs]).numpy(), 1 - RATE)
        writer = None
        for rb, ((conf, label), score, x) in zip(batches, outs):
            hard = score > threshold
            label, conf = label.clone(), conf.clone()
            if hard.any():
                pt = torch.cat([torch.softmax(t(xh), -1) for xh in x[hard].split(16384)])
                conf[hard], label[hard] = pt.max(-1)
            table = pa.Table.from_batches([rb]).append_column("label", pa.array(label.numpy()))
            table = table.append_column("confidence", pa.array(conf.numpy()))
            table = table.append_column("deferral_score", pa.array(score.numpy()))
            table = table.append_column("source", pa.array(np.where(hard.numpy(), "teacher", "student")))
            writer = writer or pq.ParquetWriter(out, table.schema, compression="snappy")
            writer.write_table(table)
        writer.close()


def stock_beam(data: str, student: str) -> None:
    """(c): stock Beam, one Python dict and one tensor per row, student only."""
    import apache_beam as beam
    import torch
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

    with beam.Pipeline(runner="FnApiRunner") as p:
        _ = (p | beam.io.ReadFromParquet(data)
             | beam.Map(lambda r: torch.tensor(r["features"], dtype=torch.float32))
             | RunInference(PytorchModelHandlerTensor(torch_script_model_path=student,
                                                      max_batch_size=1024))
             | beam.combiners.Count.Globally())


def compute_only(student: str, teacher: str, rows: int, batch: int = 65536) -> None:
    """(d): the models alone on tensors already in memory; prints rows/s as JSON."""
    import torch

    s, t = torch.jit.load(student), torch.jit.load(teacher)
    x = torch.randn(rows, DIM)
    hard_rows = int(rows * RATE)
    with torch.inference_mode():
        s(x[:batch]), t(x[:batch // 4])  # warm up (TorchScript profiles its first calls)
        start = time.perf_counter()
        for i in range(0, rows, batch):
            s(x[i:i + batch])
        for i in range(0, hard_rows, 16384):
            t(x[i:i + 16384])
        seconds = time.perf_counter() - start
    print(json.dumps({"rows_per_second": rows / seconds}))


def base_titans(ref: str, workdir: str) -> list[str]:
    """The `titans run` command of commit ``ref``: its tree checked out beside the data, put
    first on PYTHONPATH (the installed package stays as it is)."""
    tree = os.path.abspath(os.path.join(workdir, f"base-{ref}"))
    if not os.path.isdir(tree):
        subprocess.run(["git", "worktree", "add", "--detach", tree, ref], check=True,
                       capture_output=True)
    package = os.path.join(tree, ".site", "titans")
    os.makedirs(package, exist_ok=True)
    open(os.path.join(package, "__init__.py"), "a").close()
    for folder in ("pipeline", "transforms", "models"):
        if not os.path.islink(os.path.join(package, folder)):
            os.symlink(os.path.join(tree, folder), os.path.join(package, folder))
    cli = ("titans.pipeline.cli.main" if os.path.isdir(os.path.join(tree, "pipeline", "cli"))
           else "titans.pipeline.cli")  # before and after the layout of issue 17
    return ["env", f"PYTHONPATH={os.path.dirname(package)}", sys.executable, "-m", cli,
            "--log-level", "WARNING", "run"]


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MiB of the process and its children, stdout), fresh process.
    The page cache is flushed first (not timed): otherwise the write-back of the previous
    run's output (1 GB at 4M rows) lands in this run's time, a 0.1-0.7 s penalty measured on
    whichever side always comes second."""
    os.sync()
    wrapper = [sys.executable, __file__, "measure", "--"] + cmd
    out = subprocess.run(wrapper, check=True, capture_output=True, text=True)
    last = json.loads(out.stdout.strip().splitlines()[-1])
    return last["seconds"], last["peak_mib"], out.stdout


def measure(cmd: list[str]) -> None:
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(proc.returncode)
    sys.stdout.write(proc.stdout)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mib": peak_kib // 1024}))


class Runs:
    """Repeated timings of one side: median, min, max."""

    def __init__(self, name: str):
        self.name, self.seconds, self.peaks, self.phases = name, [], [], []

    def add(self, result: tuple[float, int, str], report: str | None = None) -> None:
        self.seconds.append(result[0])
        self.peaks.append(result[1])
        if report:
            self.phases.append(json.load(open(report)).get("phase_seconds", {}))

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def line(self, rows: int) -> str:
        return (f"{self.name:<44} median {self.median:6.2f} s ({rows / self.median:9,.0f} rows/s)"
                f"  min {min(self.seconds):.2f}  max {max(self.seconds):.2f}  "
                f"peak {statistics.median(self.peaks):.0f} MiB  [{len(self.seconds)} runs]")

    def phase_line(self) -> str:
        if not self.phases:
            return ""
        names = list(self.phases[0])
        med = {n: statistics.median(p.get(n, 0.0) for p in self.phases) for n in names}
        return "    phases (median s): " + ", ".join(f"{n} {v:.2f}" for n, v in med.items())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        return measure(sys.argv[3:])
    if len(sys.argv) > 1 and sys.argv[1] == "handwritten":
        return handwritten(*sys.argv[2:6])
    if len(sys.argv) > 1 and sys.argv[1] == "stock":
        return stock_beam(sys.argv[2], sys.argv[3])
    if len(sys.argv) > 1 and sys.argv[1] == "compute":
        return compute_only(sys.argv[2], sys.argv[3], int(sys.argv[4]))

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows for (a) and (b) (default: 1M)")
    ap.add_argument("--memory-rows", type=int, default=4_000_000,
                    help="second size for (a) and (b): peak memory and marginal rows/s; 0 to skip "
                         "(default: 4M)")
    ap.add_argument("--stock-rows", type=int, default=100_000,
                    help="rows for (c), which is slow; it also runs on a quarter of them")
    ap.add_argument("--repeat", type=int, default=5,
                    help="interleaved runs of every side and size (default: 5)")
    ap.add_argument("--pairs", default="small,large", help="model pairs to run (default: small,large)")
    ap.add_argument("--workdir", default="benchmarks/out", help="data, models and outputs")
    ap.add_argument("--base-ref", metavar="REV",
                    help="also time (b) of this git commit, interleaved, and print its ratio")
    ap.add_argument("--beam-args", default="",
                    help="pipeline options for (b) (default: none: titans' own defaults)")
    args = ap.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    w = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    n, m, r = args.rows, args.memory_rows, args.repeat
    sizes = [s for s in (n, m) if s]
    c_sizes = (args.stock_rows // 4, args.stock_rows)
    for rows in (*sizes, *c_sizes):
        make_data(w(f"data-{rows}.parquet"), rows)
    titans = [sys.executable, "-m", "titans.pipeline.cli.main", "--log-level", "WARNING", "run"]
    pairs = args.pairs.split(",")
    print(f"{datetime.date.today()}: {os.cpu_count()} CPUs; rows x {DIM} float32 in one Parquet "
          f"file (pyarrow's default 1M-row groups); deferral rate {RATE}; whole processes; "
          f"{r} interleaved runs per side, medians")

    results = {}
    for pair in pairs:
        student, teacher = make_models(args.workdir, pair)
        a = {rows: Runs(f"(a) hand-written loop, {rows:,} rows") for rows in sizes}
        b = {rows: Runs(f"(b) titans run, {rows:,} rows") for rows in sizes}
        b0 = {rows: Runs(f"(b0) titans run of {args.base_ref}, {rows:,} rows") for rows in sizes}
        def side_a(rows):
            a[rows].add(timed([sys.executable, __file__, "handwritten", w(f"data-{rows}.parquet"),
                               student, teacher, w(f"out-a-{rows}.parquet")]))

        def side_b(rows):
            out = w(f"out-b-{pair}-{rows}")
            b[rows].add(timed(titans + [
                "--input", w(f"data-{rows}.parquet"), "--output", out, "--student", student,
                "--teacher", teacher, "--overwrite", "--deferral-rate", str(RATE)]
                + args.beam_args.split()), os.path.join(out, "report.json"))

        def side_b0(rows):
            b0[rows].add(timed(base_titans(args.base_ref, args.workdir) + [
                "--input", w(f"data-{rows}.parquet"), "--output", w(f"out-b-{pair}-{rows}-base"),
                "--student", student, "--teacher", teacher, "--overwrite",
                "--deferral-rate", str(RATE)] + args.beam_args.split()))

        sides = [side_a, side_b] + ([side_b0] if args.base_ref else [])
        for i in range(r):
            for rows in sizes:
                # the order rotates each round: no side always runs right after the same one
                for side in sides[i % len(sides):] + sides[:i % len(sides)]:
                    side(rows)
        bound = statistics.median(json.loads(subprocess.run(
            [sys.executable, __file__, "compute", student, teacher, str(n)], check=True,
            capture_output=True, text=True).stdout.strip().splitlines()[-1])["rows_per_second"]
            for _ in range(3))
        results[pair] = (a, b, bound)
        hidden = PAIRS[pair]
        print(f"\n== {pair} pair: student MLP {DIM}-{hidden[0]}-{CLASSES}, teacher MLP "
              f"{DIM}-{hidden[1]}-{CLASSES}")
        for rows in sizes:
            print(a[rows].line(rows))
            print(b[rows].line(rows))
            print(b[rows].phase_line())
            print(f"b/a = {a[rows].median / b[rows].median:.2f} at {rows:,} rows   (target >= 1.0 "
                  f"at 1M)")
            if args.base_ref:
                print(b0[rows].line(rows))
                print(f"b/b0 = {b0[rows].median / b[rows].median:.2f} at {rows:,} rows   (>= 1: "
                      f"no slower than {args.base_ref})")
        print(f"(d) compute alone (student on all rows, teacher on {RATE:.0%}): {bound:,.0f} rows/s")
        if m:
            marginal = (m - n) / (b[m].median - b[n].median)
            print(f"(b) marginal rows/s, {n:,} -> {m:,} rows: {marginal:,.0f} = "
                  f"{marginal / bound:.2f} x the compute-only bound   (target >= 0.7)")
            print(f"(b) peak memory: {statistics.median(b[n].peaks):.0f} MiB at {n:,} rows, "
                  f"{statistics.median(b[m].peaks):.0f} MiB at {m:,} rows: ratio "
                  f"{statistics.median(b[m].peaks) / statistics.median(b[n].peaks):.2f}   "
                  f"(target <= 1.5)")

    if "small" in results and m:
        student, _ = make_models(args.workdir, "small")
        c = {rows: Runs(f"(c) stock Beam per-row, {rows:,} rows") for rows in c_sizes}
        for _ in range(r):
            for rows in c_sizes:
                c[rows].add(timed([sys.executable, __file__, "stock", w(f"data-{rows}.parquet"),
                                   student]))
        c_marginal = (c_sizes[1] - c_sizes[0]) / (c[c_sizes[1]].median - c[c_sizes[0]].median)
        a, b, _ = results["small"]
        b_marginal = (m - n) / (b[m].median - b[n].median)
        print("\n== stock Beam, student only (small pair)")
        for rows in c_sizes:
            print(c[rows].line(rows))
        print(f"b/c = {b_marginal / c_marginal:.1f} marginal rows/s, start-up excluded on both "
              f"sides (b {b_marginal:,.0f}, c {c_marginal:,.0f})   (target >= 30)")


if __name__ == "__main__":
    main()
