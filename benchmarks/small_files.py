"""Many small files against one file (issue 19, point 1): `titans run` on the same rows both ways.

    python benchmarks/small_files.py [--rows 1500000] [--files 3000] [--runs 5] [--base-ref REV]

The rows are throughput.py's (N x 64 float32 + an int64 id, its ``make_data``), and so are the
models (the small pair: student MLP 64-32-10, teacher 64-256-256-10) and the deferral rate
(0.2). Two inputs hold the same rows:
  (one)   one Parquet file, pyarrow's default 1M-row groups (throughput.py's file);
  (small) --files Parquet files of rows/files rows each (a directory, one row group per file).
With --format tfrecord, both sides are uncompressed TFRecord files of tf.train.Example instead.
Each side is `titans run` as a whole process (throughput.py's ``timed``), interleaved
(one, small, one, small, ...) so a drifting load hits both alike; medians with min-max, and
the ratio small/one of rows/s (target >= 0.7). With --base-ref REV, `titans run` of commit
REV (throughput.py's ``base_titans``: a git worktree under --workdir) runs on both inputs
too, interleaved in the same rounds: the before and after figures of one run. Every run's
report.json is checked: every row in, none dead-lettered.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (make_data, make_models, timed, Runs, base_titans)

TITANS = [sys.executable, "-m", "titans.pipeline.cli.main", "--log-level", "WARNING", "run"]


def make_small_files(workdir: str, rows: int, files: int,
                     fmt: str = "parquet") -> tuple[str, str]:
    """(the one file, the directory of ``files`` files) holding the same ``rows`` rows, as
    Parquet or as uncompressed TFRecord files of tf.train.Example."""
    import pyarrow.parquet as pq

    from titans.transforms.io.tfrecord import write_table as write_tfrecord

    one = os.path.join(workdir, f"data-{rows}.parquet")  # shared with throughput.py
    throughput.make_data(one, rows)
    write, suffix = ((pq.write_table, ".parquet") if fmt == "parquet" else
                     (lambda t, path: write_tfrecord(t, path), ".tfrecord"))
    if fmt != "parquet":
        parquet, one = one, os.path.join(workdir, f"data-{rows}.tfrecord")
        if not os.path.exists(one):
            write(pq.read_table(parquet), one + ".tmp")
            os.rename(one + ".tmp", one)
    directory = os.path.join(workdir, f"small-{fmt}-{files}-of-{rows}")
    if not os.path.isdir(directory):
        table = pq.read_table(os.path.join(workdir, f"data-{rows}.parquet"))
        os.makedirs(directory + ".tmp", exist_ok=True)
        for i in range(files):
            lo, hi = rows * i // files, rows * (i + 1) // files
            write(table.slice(lo, hi - lo), os.path.join(directory + ".tmp", f"part-{i:05d}{suffix}"))
        os.rename(directory + ".tmp", directory)
    return one, directory


def checked(report_path: str, rows: int) -> None:
    report = json.load(open(report_path))
    if report["rows_in"] != rows or report["rows_dead_letter"] or not report["conservation_ok"]:
        raise SystemExit(f"{report_path}: rows_in {report['rows_in']} (expected {rows}), "
                         f"dead letter {report['rows_dead_letter']}, conservation "
                         f"{report['conservation_ok']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_500_000, help="rows on each side (default: 1.5M)")
    ap.add_argument("--files", type=int, default=3000,
                    help="files the small side splits them into (default: 3000)")
    ap.add_argument("--runs", type=int, default=5,
                    help="interleaved runs of every side (default: 5)")
    ap.add_argument("--format", choices=("parquet", "tfrecord"), default="parquet",
                    help="the files' format, the same on both sides (default: parquet)")
    ap.add_argument("--workdir", default="benchmarks/out", help="data, models and outputs")
    ap.add_argument("--base-ref", metavar="REV",
                    help="also time `titans run` of this git commit on both inputs, interleaved")
    ap.add_argument("--ref", metavar="REV",
                    help="time `titans run` of this git commit (a worktree, as --base-ref) instead "
                         "of the working tree's: figures of a commit while the tree is being "
                         "edited")
    args = ap.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    one, small = make_small_files(args.workdir, args.rows, args.files, args.format)
    student, teacher = throughput.make_models(args.workdir, "small")
    # each run gets an empty output (removed before it) rather than --overwrite, so both
    # commits do the same work whatever their --overwrite does
    flags = ["--student", student, "--teacher", teacher, "--deferral-rate", str(throughput.RATE)]
    titans = throughput.base_titans(args.ref, args.workdir) if args.ref else TITANS
    at = f" of {args.ref}" if args.ref else ""
    sides = {"one": (f"(one) titans run{at}, one file", titans, one),
             "small": (f"(small) titans run{at}, {args.files:,} files", titans, small)}
    if args.base_ref:
        base = throughput.base_titans(args.base_ref, args.workdir)
        sides["one0"] = (f"(one0) titans run of {args.base_ref}, one file", base, one)
        sides["small0"] = (f"(small0) titans run of {args.base_ref}, {args.files:,} files", base,
                           small)
    runs = {key: throughput.Runs(name) for key, (name, _, _) in sides.items()}
    print(f"{datetime.date.today()}: {os.cpu_count()} CPUs; {args.rows:,} rows x "
          f"{throughput.DIM} float32 as {args.format}, one file or {args.files:,} files of "
          f"{args.rows // args.files:,} rows; small model pair, deferral rate {throughput.RATE}; "
          f"whole processes; {args.runs} interleaved runs per side, medians (min-max)")
    for _ in range(args.runs):
        for key, (_, command, data) in sides.items():
            out = os.path.join(args.workdir, f"out-small-files-{args.format}-{key}")
            report = os.path.join(out, "report.json")
            shutil.rmtree(out, ignore_errors=True)
            runs[key].add(throughput.timed(command + ["--input", data, "--output", out] + flags),
                          report)
            checked(report, args.rows)
    for key in sides:
        print(runs[key].line(args.rows))
        print(runs[key].phase_line())
    ratio = runs["one"].median / runs["small"].median
    print(f"small/one = {ratio:.2f} (rows/s of {args.files:,} files over one file's)   "
          f"(target >= 0.7)")
    if args.base_ref:
        print(f"small0/one0 = {runs['one0'].median / runs['small0'].median:.2f} at "
              f"{args.base_ref} (before)")
        print(f"small/small0 = {runs['small0'].median / runs['small'].median:.2f}, "
              f"one/one0 = {runs['one0'].median / runs['one'].median:.2f}   (>= 1: no slower "
              f"than {args.base_ref})")


if __name__ == "__main__":
    main()
