"""Which local settings make `titans run` fastest on this machine: the table behind the defaults.

    python benchmarks/local_defaults.py [--rows 1000000] [--pair large] [--repeat 5]

Runs `titans run --deferral-rate 0.2` (whole processes, the data and models of
benchmarks/throughput.py) with titans' defaults and with one setting changed at a time:
the runner, torch's intra-op threads, Beam's workers, the batch sizes and torch's OpenMP
wait policy. Settings are interleaved round by round, each round starting one setting later
(the machine drifts by 20-40%), and
the table gives the median wall time and the median `processing` phase of report.json
(the part the settings act on; start-up is the same for all).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

from throughput import RATE, Runs, make_data, make_models, timed

SETTINGS = [  # (name, extra flags, extra environment)
    ("defaults", [], {}),
    ("--runner DirectRunner (Beam's default)", ["--runner", "DirectRunner"], {}),
    ("OMP_NUM_THREADS=1", [], {"OMP_NUM_THREADS": "1"}),
    ("OMP_WAIT_POLICY=ACTIVE (torch's default)", [], {"OMP_WAIT_POLICY": "ACTIVE"}),
    ("--direct_num_workers 2 (threads), 1 torch thread",
     ["--direct_num_workers", "2", "--direct_running_mode", "multi_threading"],
     {"OMP_NUM_THREADS": "1"}),
    ("--direct_num_workers 2 (threads), 2 torch threads",
     ["--direct_num_workers", "2", "--direct_running_mode", "multi_threading"], {}),
    ("--batch-size 16384", ["--batch-size", "16384"], {}),
    ("--batch-size 131072", ["--batch-size", "131072"], {}),
    ("--teacher-batch-size 4096", ["--teacher-batch-size", "4096"], {}),
    ("--teacher-batch-size 65536", ["--teacher-batch-size", "65536"], {}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="input rows (default: 1M)")
    ap.add_argument("--pair", default="large", choices=["small", "large"],
                    help="model pair of benchmarks/throughput.py (default: large)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds over all settings (default: 5)")
    ap.add_argument("--workdir", default="benchmarks/out", help="data, models and outputs")
    args = ap.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    data = os.path.join(args.workdir, f"data-{args.rows}.parquet")
    make_data(data, args.rows)
    student, teacher = make_models(args.workdir, args.pair)
    out = os.path.join(args.workdir, "out-defaults")
    base = [sys.executable, "-m", "titans.pipeline.cli.main", "--log-level", "WARNING", "run",
            "--input", data, "--output", out, "--student", student, "--teacher", teacher,
            "--overwrite", "--deferral-rate", str(RATE)]
    runs = {name: Runs(name) for name, _, _ in SETTINGS}
    environ = dict(os.environ)
    for round_ in range(args.repeat):
        # each round starts one setting later, so none always runs first (or after the same one)
        shift = round_ % len(SETTINGS)
        for name, flags, env in SETTINGS[shift:] + SETTINGS[:shift]:
            os.environ.clear()
            os.environ.update({**environ, **env})
            try:
                runs[name].add(timed(base + flags), os.path.join(out, "report.json"))
            finally:
                os.environ.clear()
                os.environ.update(environ)
    print(f"`titans run` on {args.rows:,} rows, {args.pair} pair, {args.repeat} interleaved "
          f"rounds, medians (min-max)\n")
    print("| setting | wall s | processing s |\n|---|---:|---:|")
    for name, _, _ in SETTINGS:
        r = runs[name]
        processing = [p.get("processing", float("nan")) for p in r.phases]
        print(f"| {name} | {r.median:.2f} ({min(r.seconds):.2f}-{max(r.seconds):.2f}) | "
              f"{statistics.median(processing):.2f} |")


if __name__ == "__main__":
    main()
