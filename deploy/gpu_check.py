"""Does titans' teacher stage run on the GPU, and how close does it get to a bare torch loop?

Run once on a machine with an NVIDIA GPU (a GPU VM, or the image: `docker run --rm --gpus all
--entrypoint python IMAGE /template/deploy/gpu_check.py`):

    python deploy/gpu_check.py               # ~1 minute; exit 1 if the teacher did not use CUDA
    python deploy/gpu_check.py --smoke       # CPU only, small sizes, seconds (what CI runs)

It builds the teacher MLP 64-512-512-10 (titans.models.architectures.MLP), saves it as
TorchScript in a temp dir, and makes random float32 rows as Arrow tables. Then it runs the
teacher stage as the cascade does -- Beam RunInference with titans' ArrowModelHandler and the
teacher annotation TeacherLabels, on Beam's in-process runner (--runner FnApiRunner) -- once
on cuda and once on the CPU, and the same model in a bare torch loop on the GPU (tensor from
numpy, to the device, forward, logits back to the CPU: what the stage's forward does, without
Beam and Arrow). First it prints torch's CUDA build (torch.version.cuda), the driver
(nvidia-smi, else the CUDA driver API version torch sees) and a timed float32 matmul on the
device, the card's raw speed apart from titans. Throughput is steady-state rows/s: from the first batch's completion to the
last, so start-up and model loading are left out on both sides. It prints the card, the rows/s
of the three runs, the device the loaded model's parameters were on in every batch, and the
ratio stage/bare (target >= 0.8).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

TARGET = 0.8
DIM, HIDDEN, CLASSES = 64, (512, 512), 10
NAMESPACE = "gpu_check"


def save_teacher(directory: str) -> tuple[str, int]:
    from titans.models.architectures import MLP
    from titans.models.loading import count_parameters
    from titans.transforms.io.models import save_torchscript

    torch.manual_seed(0)
    model = MLP(DIM, CLASSES, HIDDEN)
    path = os.path.join(directory, "teacher.pt")
    save_torchscript(model, path)
    return path, count_parameters(model)


def feature_arrays(batch_rows: int, distinct: int, seed: int = 0) -> list[np.ndarray]:
    """A few distinct batches, reused in turn, so that making data is not what is timed."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch_rows, DIM), dtype=np.float32) for _ in range(distinct)]


def as_table(x: np.ndarray) -> pa.Table:
    """A table as the teacher stage receives it: features plus the student's label columns,
    which TeacherLabels replaces."""
    n = len(x)
    return pa.table({
        "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM),
        "label": pa.array(np.zeros(n, np.int64)),
        "confidence": pa.array(np.zeros(n, np.float32)),
    })


def run_stage(model_path: str, device: str, batches: int, batch_rows: int, distinct: int) -> dict:
    """The teacher stage in a Beam pipeline on the in-process runner; steady rows/s."""
    import apache_beam as beam
    from apache_beam.metrics import Metrics
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from titans.models.loading import ModelRef
    from titans.transforms import arrow_coder  # noqa: F401  registers the pa.Table coder
    from titans.transforms.features import FeatureSpec
    from titans.transforms.inference import ArrowModelHandler
    from titans.transforms.labels import LabelColumns, TeacherLabels

    class ProbedHandler(ArrowModelHandler):
        """Counts, per batch, the device the loaded model's parameters are on."""

        def run_inference(self, batch, model, inference_args=None):
            params = next(iter(model.module.parameters()), None)
            where = params.device.type if params is not None else str(model.device)
            Metrics.counter(NAMESPACE, f"batches_on_{where}").inc()
            return super().run_inference(batch, model, inference_args)

    class Tables(beam.DoFn):
        def setup(self):
            self._tables = [as_table(x) for x in feature_arrays(batch_rows, distinct)]

        def process(self, i):
            yield self._tables[i % len(self._tables)]

    class Clock(beam.DoFn):
        def process(self, table):
            Metrics.counter(NAMESPACE, "rows").inc(table.num_rows)
            Metrics.distribution(NAMESPACE, "done_us").update(time.time_ns() // 1000)

    handler = ProbedHandler(ModelRef(model_path, device=device),
                            FeatureSpec(columns=("features",), dim=DIM, vector=True),
                            TeacherLabels(LabelColumns()), batch_size=batch_rows, name="teacher")
    start = time.perf_counter()
    p = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    tables = (p | "Batches" >> beam.Create(list(range(batches)))
              | "Tables" >> beam.ParDo(Tables()).with_output_types(pa.Table))
    scored = tables | "ScoreTeacher" >> RunInference(handler)
    scored.element_type = pa.Table  # Arrow coder for size sampling, as the cascade does
    _ = scored | "Clock" >> beam.ParDo(Clock())
    result = p.run()
    result.wait_until_finish()
    wall = time.perf_counter() - start

    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counters = {c.key.metric.name: c.committed or c.attempted or 0 for c in metrics["counters"]}
    done = [d.committed or d.attempted for d in metrics["distributions"]
            if d.key.metric.name == "done_us"][0]
    span = (done.max - done.min) / 1e6
    return {
        "rows": counters.get("rows", 0),
        "rows_per_s": (batches - 1) * batch_rows / span if span > 0 else float("nan"),
        "wall_s": wall,
        "batches_on": {k[len("batches_on_"):]: v for k, v in counters.items()
                       if k.startswith("batches_on_")},
    }


def driver_version() -> str:
    """The NVIDIA driver (nvidia-smi), else the CUDA driver API version torch sees, else why
    neither is there. The driver must be new enough for torch's CUDA (torch.version.cuda)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                   "--format=csv,noheader"], capture_output=True, text=True,
                                  timeout=60)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip().splitlines()[0] + " (nvidia-smi)"
        except (OSError, subprocess.SubprocessError):
            pass
    if torch.cuda.is_available():
        v = torch._C._cuda_getDriverVersion()  # pylint: disable=protected-access
        return f"CUDA driver API {v // 1000}.{v % 1000 // 10} (torch; no nvidia-smi)"
    return "none found (no nvidia-smi, no CUDA device)"


def timed_matmul(device: str, n: int, repeats: int) -> dict:
    """n x n float32 matmuls on ``device``: the raw speed of the card, apart from titans."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    (a @ b).sum().item()  # first call: kernels, allocator, cuBLAS handle
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        c = a @ b
    sync()
    seconds = (time.perf_counter() - start) / repeats
    del c
    return {"n": n, "ms": seconds * 1e3, "tflops": 2 * n ** 3 / seconds / 1e12}


def run_bare(model_path: str, device: str, batches: int, batch_rows: int, distinct: int) -> dict:
    """The same model in a plain loop: from_numpy -> to(device) -> forward -> .float().cpu()."""
    xs = feature_arrays(batch_rows, distinct)
    model = torch.jit.load(model_path, map_location=device).eval()
    with torch.inference_mode():
        def step(i):
            xb = torch.from_numpy(xs[i % len(xs)])
            if device != "cpu":
                xb = xb.to(device, non_blocking=True)
            return model(xb).float().cpu()  # .cpu() waits for the GPU

        step(0)  # first batch: CUDA context, kernels, allocator (the stage skips it too)
        start = time.perf_counter()
        for i in range(1, batches):
            step(i)
        span = time.perf_counter() - start
    return {"rows": batches * batch_rows,
            "rows_per_s": (batches - 1) * batch_rows / span if span > 0 else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows on the GPU (default: %(default)s)")
    ap.add_argument("--cpu-rows", type=int, default=262_144,
                    help="rows for the CPU run of the stage (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16_384,
                    help="rows per teacher batch, titans' --teacher-batch-size default (default: %(default)s)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU only, small sizes: checks that the check itself runs (seconds)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.rows, a.cpu_rows, a.batch_size = 8_192, 8_192, 1_024
        torch.set_num_threads(1)  # tiny batches: threads only contend on a shared CI machine
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("titans").setLevel(logging.INFO)  # "teacher model ... loaded on cuda (...)"

    has_cuda = torch.cuda.is_available()
    print(f"gpu_check: torch {torch.__version__}, CUDA build {torch.version.cuda}, "
          f"device: {torch.cuda.get_device_name(0) if has_cuda else 'no CUDA device'}")
    if not has_cuda and not a.smoke:
        print("FAIL: torch sees no CUDA device. On Dataflow the teacher would fail with "
              "--teacher-device cuda (or run on the CPU with auto). Check the driver "
              "(nvidia-smi) and that torch is a CUDA build.")
        return 1
    gpu = "cuda" if has_cuda else "cpu"
    print(f"driver: {driver_version()}; torch.version.cuda: {torch.version.cuda}")
    mm = timed_matmul(gpu, 512 if a.smoke else 8192, 3 if a.smoke else 20)
    print(f"matmul on {gpu}: {mm['n']}x{mm['n']} float32 in {mm['ms']:.2f} ms "
          f"({mm['tflops']:.2f} TFLOP/s)")
    distinct = 8

    def batches(rows):
        return max(2, rows // a.batch_size)

    with tempfile.TemporaryDirectory() as tmp:
        model_path, n_params = save_teacher(tmp)
        print(f"teacher: MLP {DIM}-{'-'.join(map(str, HIDDEN))}-{CLASSES} ({n_params:,} parameters), "
              f"TorchScript; batches of {a.batch_size:,} rows; runner FnApiRunner")
        results = {}
        if has_cuda:
            results["stage_gpu"] = run_stage(model_path, "cuda", batches(a.rows), a.batch_size, distinct)
        results["stage_cpu"] = run_stage(model_path, "cpu", batches(a.cpu_rows), a.batch_size, distinct)
        results["bare"] = run_bare(model_path, gpu, batches(a.rows), a.batch_size, distinct)

    def line(label, r):
        extra = f" ({r['rows']:,} rows"
        if "wall_s" in r:
            extra += f"; whole pipeline incl. start-up and model load {r['wall_s']:.1f} s"
        return f"{label:<28}: {r['rows_per_s']:>14,.0f} rows/s{extra})"

    ok = True
    for key, dev in (("stage_gpu", "cuda"), ("stage_cpu", "cpu")):
        if key not in results:
            continue
        s = results[key]
        print(line(f"teacher stage on {dev}", s))
        n = sum(s["batches_on"].values())
        on_dev = s["batches_on"].get(dev, 0)
        print(f"  model parameters on {dev} in {on_dev} of {n} batches")
        if n == 0 or on_dev != n:
            ok = False
            print(f"FAIL: the teacher stage ran on {s['batches_on']}, not only on {dev}")
    print(line(f"bare torch loop on {gpu}", results["bare"]))
    stage = results["stage_gpu" if has_cuda else "stage_cpu"]
    ratio = stage["rows_per_s"] / results["bare"]["rows_per_s"]
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"ratio stage/bare on {gpu}: {ratio:.2f} (target >= {TARGET}): {verdict}"
          + ("  [smoke: CPU only, sizes too small to mean anything]" if a.smoke else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
