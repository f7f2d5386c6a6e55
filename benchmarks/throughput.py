"""Throughput of `titans run` against two baselines measured in the same run.

    python benchmarks/throughput.py --rows 1000000 [--memory-rows 4000000]

(a) a hand-written pyarrow + torch loop doing the same cascade (student on all rows,
    margin rule at deferral rate 0.2, teacher on the hard rows, Parquet out);
(b) `titans run` on the DirectRunner with the same models and data;
(c) stock Beam: ReadFromParquet -> one tensor per row -> RunInference(
    PytorchModelHandlerTensor) for the student alone, on --stock-rows rows.
Each is timed as a whole process (importing Beam and torch is part of the cost) and (b)'s
peak memory is read at --rows and --memory-rows. Prints rows/s, b/a, b/c and the memory ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DIM, CLASSES, RATE = 64, 10, 0.2
STUDENT_HIDDEN, TEACHER_HIDDEN = (32,), (256, 256)


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


def make_models(directory: str) -> tuple[str, str]:
    import torch

    from titans.models.architectures import MLP
    from titans.models.loading import save_torchscript

    paths = (os.path.join(directory, "student.pt"), os.path.join(directory, "teacher.pt"))
    if not all(os.path.exists(p) for p in paths):
        torch.manual_seed(0)
        save_torchscript(MLP(DIM, CLASSES, STUDENT_HIDDEN), paths[0])
        save_torchscript(MLP(DIM, CLASSES, TEACHER_HIDDEN), paths[1])
    return paths


def handwritten(data: str, student: str, teacher: str, out: str, batch: int = 65536) -> None:
    """(a): the loop a careful engineer would write by hand, one pass over the file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    s, t = torch.jit.load(student), torch.jit.load(teacher)
    batches, outs = [], []
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


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MiB of the process and its children, stdout), fresh process."""
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


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        return measure(sys.argv[3:])
    if len(sys.argv) > 1 and sys.argv[1] == "handwritten":
        return handwritten(*sys.argv[2:6])
    if len(sys.argv) > 1 and sys.argv[1] == "stock":
        return stock_beam(sys.argv[2], sys.argv[3])

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows for (a) and (b)")
    ap.add_argument("--memory-rows", type=int, default=4_000_000,
                    help="second size for (a) and (b): peak memory and marginal rows/s; 0 to skip")
    ap.add_argument("--stock-rows", type=int, default=100_000,
                    help="rows for (c), which is slow; it also runs on a quarter of them")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of (a) and (b) at --rows, interleaved (one fewer at "
                         "--memory-rows); the fastest counts")
    ap.add_argument("--workdir", default="benchmarks/out", help="data, models and outputs")
    ap.add_argument("--beam-args", default="--runner=DirectRunner",
                    help="pipeline options for (b) (default: %(default)s)")
    args = ap.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    w = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    student, teacher = make_models(args.workdir)
    n, m = args.rows, args.memory_rows
    c_sizes = (args.stock_rows // 4, args.stock_rows)
    for rows in (n, m, *c_sizes):
        if rows:
            make_data(w(f"data-{rows}.parquet"), rows)
    titans = [sys.executable, "-m", "titans.pipeline.cli", "--log-level", "WARNING", "run"]

    def run_a(rows):
        return timed([sys.executable, __file__, "handwritten", w(f"data-{rows}.parquet"),
                      student, teacher, w(f"out-a-{rows}.parquet")])

    def run_b(rows):
        return timed(titans + ["--input", w(f"data-{rows}.parquet"), "--output", w(f"out-b-{rows}"),
                               "--student", student, "--teacher", teacher, "--overwrite",
                               "--deferral-rate", str(RATE)] + args.beam_args.split())

    def run_c(rows):
        return timed([sys.executable, __file__, "stock", w(f"data-{rows}.parquet"), student])

    a_runs, b_runs = [], []
    for _ in range(args.repeat):  # interleaved, so drifting machine load hits both alike
        a_runs.append(run_a(n))
        b_runs.append(run_b(n))
    (a_s, a_mib, _), (b_s, b_mib, _) = min(a_runs), min(b_runs)
    deferral = json.load(open(w(f"out-b-{n}/report.json")))["deferral_rate"]
    c1_s, _, _ = run_c(c_sizes[0])
    c2_s, _, _ = run_c(c_sizes[1])
    c_marginal = (c_sizes[1] - c_sizes[0]) / (c2_s - c1_s)

    print(f"machine: {os.cpu_count()} CPUs; {n:,} rows x {DIM} float32 in one Parquet file "
          f"(pyarrow's default 1M-row groups); student MLP {DIM}-{STUDENT_HIDDEN}-{CLASSES}, "
          f"teacher MLP {DIM}-{TEACHER_HIDDEN}-{CLASSES}; whole processes, best of {args.repeat}")
    print(f"(a) hand-written pyarrow+torch loop  : {a_s:7.2f} s {n / a_s:10,.0f} rows/s  "
          f"peak {a_mib} MiB   runs {', '.join(f'{r[0]:.2f}' for r in a_runs)}")
    print(f"(b) titans run {args.beam_args:20s}: {b_s:7.2f} s {n / b_s:10,.0f} rows/s  "
          f"peak {b_mib} MiB   runs {', '.join(f'{r[0]:.2f}' for r in b_runs)}  "
          f"(deferral {deferral:.3f})")
    print(f"(c) stock Beam, per-row RunInference, student only: {c_sizes[0]:,} rows {c1_s:.2f} s, "
          f"{c_sizes[1]:,} rows {c2_s:.2f} s -> {c_sizes[1] / c2_s:,.0f} rows/s whole process, "
          f"{c_marginal:,.0f} rows/s marginal")
    print(f"b/a = {a_s / b_s:.2f} at {n:,} rows, whole processes   (target >= 0.9)")
    print(f"b/c = {(n / b_s) / (c_sizes[1] / c2_s):.1f} whole processes "
          f"(b on {n:,} rows, c on {c_sizes[1]:,})")
    if m:
        (am_s, _, _), (bm_s, bm_mib, _) = min(run_a(m) for _ in range(max(1, args.repeat - 1))), \
            min(run_b(m) for _ in range(max(1, args.repeat - 1)))
        b_marginal = (m - n) / (bm_s - b_s)
        print(f"at {m:,} rows: (a) {am_s:.2f} s ({m / am_s:,.0f} rows/s), (b) {bm_s:.2f} s "
              f"({m / bm_s:,.0f} rows/s), b/a = {am_s / bm_s:.2f}")
        print(f"b/c = {b_marginal / c_marginal:.1f} marginal rows/s, start-up excluded on both "
              f"sides (b {b_marginal:,.0f}, c {c_marginal:,.0f})   (target >= 30)")
        print(f"(b) peak memory: {b_mib} MiB at {n:,} rows, {bm_mib} MiB at {m:,} rows: "
              f"ratio {bm_mib / b_mib:.2f}   (target <= 1.5)")


if __name__ == "__main__":
    main()
