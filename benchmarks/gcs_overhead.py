"""What gs:// costs: `titans run` on 4,000 rows from and to a GCS JSON API on localhost
(gcp-storage-emulator) against the same run on local files, as whole processes.

Runs are interleaved (local, gs, local, gs, ...) and the medians compared, with their spread:
this machine is noisy. The emulator answers slowly but the ratio still shows how much a
run's start-up and requests cost on an object store.

    python benchmarks/gcs_overhead.py [--runs 5] [--rows 4000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per side (default: 5)")
    ap.add_argument("--rows", type=int, default=4000, help="rows (default: 4000)")
    a = ap.parse_args()
    from conftest import save_models, write_dataset

    work = tempfile.mkdtemp(prefix="titans-gcs-bench-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    server = subprocess.Popen([shutil.which("gcp-storage-emulator") or exe, "start", "--host",
                               "127.0.0.1", "--port", str(port), "--default-bucket", "bench",
                               "--in-memory", "--quiet"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        _wait_for(port)
        from titans.transforms.io import storage

        write_dataset(os.path.join(work, "data"), a.rows, files=4, row_group_size=500)
        student, teacher = save_models(work)
        for d, _, files in os.walk(os.path.join(work, "data")):
            for f in files:
                with open(os.path.join(d, f), "rb") as fh:
                    storage.write_bytes(f"gs://bench/data/{f}", fh.read())
        for m in (student, teacher):
            with open(m, "rb") as fh:
                storage.write_bytes(f"gs://bench/models/{os.path.basename(m)}", fh.read())
        sides = {
            "local": (os.path.join(work, "data"), os.path.join(work, "out"), student, teacher),
            "gs://": ("gs://bench/data/", "gs://bench/out", "gs://bench/models/student.pt",
                      "gs://bench/models/teacher.pt"),
        }
        times: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(a.runs):
            for name, (data, out, s, t) in sides.items():
                start = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "titans.pipeline.cli.main", "run", "--input", data,
                     "--output", out, "--student", s, "--teacher", t, "--overwrite",
                     "--runner", "FnApiRunner", "--batch-size", "1000"],
                    capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{name} run failed:\n{done.stderr[-2000:]}")
                times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            print(f"{k:>6}: median {med[k]:.2f} s  (min {min(v):.2f}, max {max(v):.2f}, "
                  f"{len(v)} runs)")
        print(f"gs:// / local = {med['gs://'] / med['local']:.2f} on {a.rows:,} rows "
              f"(whole processes, {a.runs} interleaved runs per side)")
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)


def _wait_for(port: int) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the GCS emulator did not start")


if __name__ == "__main__":
    main()
