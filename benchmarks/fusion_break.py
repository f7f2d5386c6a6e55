"""What the fusion break before the teacher (a Reshuffle, see pipeline/cascade.py
``fusion_break_before_teacher``) costs on the in-process runner, where it has no purpose.

    python benchmarks/fusion_break.py [--rows 1000000] [--rounds 3]

Same data and models as benchmarks/throughput.py (64 float32 features, 1M-row groups,
MLP 64-32-10 student, 64-256-256-10 teacher, deferral rate 0.2), `titans run` on the
FnApiRunner as whole processes, interleaved:
  plain       no teacher hint, no break (what a local run does)
  break       no teacher hint, break forced on (the Reshuffle's own cost)
  hint        --teacher-accelerator: the teacher in its own environment, plus the break
  hint-only   --teacher-accelerator with the break forced off
Prints the median wall time, the spread, and peak memory of each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import make_data, make_models, timed  # noqa: E402

HINT = "type:nvidia-l4;count:1;install-nvidia-driver"
# `titans run` with cascade.fusion_break_before_teacher forced to BREAK (a Python literal)
RUN = ("import sys\n"
       "from titans.pipeline.cli import main as cli\n"
       "from titans.pipeline.graphs import cascade\n"
       "force = {force}\n"
       "if force is not None: cascade.fusion_break_before_teacher = lambda config: force\n"
       "sys.exit(cli.main(sys.argv[1:]))\n")
VARIANTS = {"plain": (None, False), "break": (True, False), "hint": (None, True),
            "hint-only": (False, True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "titans-fusion-break"))
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    data = os.path.join(a.dir, f"data-{a.rows}.parquet")
    make_data(data, a.rows)
    student, teacher = make_models(a.dir)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks: dict[str, list[int]] = {v: [] for v in VARIANTS}
    for r in range(a.rounds):
        for name, (force, hint) in VARIANTS.items():
            out = os.path.join(a.dir, f"out-{name}")
            cmd = [sys.executable, "-c", RUN.format(force=force), "run", "--input", data,
                   "--output", out, "--student", student, "--teacher", teacher,
                   "--deferral-rate", "0.2", "--overwrite", "--runner", "FnApiRunner"]
            if hint:
                cmd += ["--teacher-accelerator", HINT]
            try:
                seconds, peak, _ = timed(cmd)
            except subprocess.CalledProcessError as e:
                sys.exit(f"{name} failed:\n{e.stdout}\n{e.stderr}")
            times[name].append(seconds)
            peaks[name].append(peak)
            print(f"round {r + 1} {name:10s} {seconds:6.2f} s  peak {peak} MiB", flush=True)
    base = statistics.median(times["plain"])
    for name in VARIANTS:
        t = times[name]
        print(f"{name:10s} median {statistics.median(t):6.2f} s (min {min(t):.2f}, max "
              f"{max(t):.2f}), {statistics.median(t) - base:+.2f} s vs plain, peak "
              f"{max(peaks[name])} MiB")


if __name__ == "__main__":
    main()
