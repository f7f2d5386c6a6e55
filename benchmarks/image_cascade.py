"""`titans run` on encoded images against a bare one-thread Pillow loop doing the whole cascade.

    python benchmarks/image_cascade.py [--runs 5] [--png-rows 100000] [--jpeg-rows 6000]
                                       [--only png28|jpeg224|all] [--base-ref REV]

Two workloads, each one Parquet file of an `image` binary column + an int64 `id`, made once
from data bundled with scikit-learn (no downloads) and cached in --workdir:
- png28: 28x28 grayscale PNG digits: sklearn's 8x8 digits upscaled to 28x28, each randomly
  shifted, scaled and noised; student a linear layer 784-10, teacher a small CNN
  (conv 16 - pool - conv 32 - pool - linear), both trained for a few seconds on 5,000 of
  them so that the deferral scores mean something; mode L, no resize flags.
- jpeg224: 224x224 RGB JPEGs (quality 90): random crops of sklearn's two sample photos,
  scaled 0.5-1.0x and colour-jittered; student a stride-4 conv + average pool + linear,
  teacher two convs + pool + linear (seeded, untrained: the scores only need to spread);
  mode RGB with ImageNet's mean/std on both sides.
Both at a 10% deferral rate, margin rule (titans' default), Parquet labels out.

Sides, each a whole fresh process (throughput.py's timed(): wall time and peak RSS):
  (loop)  a bare one-thread Pillow loop doing the whole cascade with no titans code: read the
          Parquet file, decode every image (Image.open().convert(), np.asarray), student on
          batches of 256 (floats made in place by torch), margin scores, the exact 0.9
          quantile as threshold, the teacher on the hard rows (their decoded pixels kept as
          uint8), Parquet out with the input columns + label, confidence, deferral_score,
          source;
  (titans) `titans run` with titans' defaults, as a new user would call it (default
          --sample-rows, batch sizes, runner);
  (base)  with --base-ref REV, `titans run` of commit REV (throughput.base_titans: a git
          worktree beside the data, first on PYTHONPATH), same flags.
Sides are interleaved (loop, titans, base, loop, ...) --runs times; medians count, with
min-max spread. Prints rows/s, the ratio titans/loop (targets: >= 1.0 on png28, >= 0.8 on
jpeg224), peak RSS, and titans' own phase seconds from report.json (where the time went).
Outputs are checked: every row in titans' report.json, none dead-lettered, the loop's
Parquet has every row.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (timed, base_titans, Runs: the same as its benchmark)

RATE = 0.1
KINDS = {  # kind -> (mode, (mean, std) per channel)
    "png28": ("L", ((0.0,), (1.0,))),
    "jpeg224": ("RGB", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),  # ImageNet's
}
TITANS = [sys.executable, "-m", "titans.pipeline.cli.main", "--log-level", "WARNING", "run"]


# ---------------------------------------------------------------------------- data and models

def digit_images(rows: int, seed: int = 0):
    """(uint8 [rows, 28, 28], labels [rows]): sklearn's digits, upscaled and jittered."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    base = [Image.fromarray((d * (255 / 16)).astype(np.uint8)) for d in digits.images]
    pick = rng.integers(0, len(base), rows)
    out = np.zeros((rows, 28, 28), np.uint8)
    for i, j in enumerate(pick):
        size = int(rng.integers(16, 23))  # the digit's box, shifted inside the 28x28 frame
        im = np.asarray(base[j].resize((size, size), Image.Resampling.BILINEAR), np.int16)
        y, x = rng.integers(0, 28 - size + 1, 2)
        noisy = im + rng.integers(-12, 13, im.shape)
        out[i, y:y + size, x:x + size] = np.clip(noisy, 0, 255)
    return out, digits.target[pick]


def photo_images(rows: int, seed: int = 0):
    """uint8 [rows, 224, 224, 3] generator: random crops of sklearn's sample photos."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for _ in range(rows):
        p = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(224, min(p.size) + 1))  # a crop of 224-427 px, scaled to 224
        x, y = rng.integers(0, p.size[0] - side + 1), rng.integers(0, p.size[1] - side + 1)
        im = p.crop((x, y, x + side, y + side)).resize((224, 224), Image.Resampling.BILINEAR)
        yield np.clip(np.asarray(im, np.float32) * rng.uniform(0.8, 1.2, 3), 0, 255).astype(np.uint8)


def make_data(workdir: str, kind: str, rows: int) -> str:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    path = os.path.join(workdir, f"{kind}-{rows}.parquet")
    if os.path.exists(path):
        return path
    if kind == "png28":
        pixels, fmt, kw = digit_images(rows)[0], "PNG", {}
    else:
        pixels, fmt, kw = photo_images(rows), "JPEG", {"quality": 90}
    blobs = []
    for a in pixels:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt, **kw)
        blobs.append(buf.getvalue())
    table = pa.table({"id": np.arange(rows, dtype=np.int64), "image": pa.array(blobs, pa.binary())})
    pq.write_table(table, path + ".tmp")
    os.rename(path + ".tmp", path)
    return path


def make_models(workdir: str, kind: str) -> tuple[str, str]:
    import torch
    from torch import nn

    from titans.transforms.io.models import save_torchscript

    paths = tuple(os.path.join(workdir, f"{kind}-{role}.pt") for role in ("student", "teacher"))
    if all(os.path.exists(p) for p in paths):
        return paths
    torch.manual_seed(0)
    if kind == "png28":
        student = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
        teacher = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
        pixels, labels = digit_images(5000, seed=1)
        x = torch.from_numpy(pixels).float().div(255).unsqueeze(1)
        y = torch.from_numpy(labels).long()
        for model, steps in ((student, 300), (teacher, 150)):
            opt = torch.optim.Adam(model.parameters(), 3e-3)
            for step in range(steps):
                i = torch.randint(0, len(x), (256,))
                loss = nn.functional.cross_entropy(model(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
    else:
        def pool():
            return nn.AdaptiveAvgPool2d(1), nn.Flatten()
        student = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), *pool(), nn.Linear(8, 10))
        teacher = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.ReLU(),
                                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                *pool(), nn.Linear(32, 10))
    save_torchscript(student.eval(), paths[0])
    save_torchscript(teacher.eval(), paths[1])
    return paths


# ---------------------------------------------------------------------------- the bare loop
# Runs in its own process (see main) and imports nothing from titans.

def loop(path: str, student: str, teacher: str, mode: str, norm: str, out: str) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    table = pq.read_table(path)
    blobs = table.column("image").to_pylist()
    s, t = torch.jit.load(student), torch.jit.load(teacher)
    channels = 3 if mode == "RGB" else 1
    mean, std = (torch.tensor(v).reshape(-1, 1, 1) for v in json.loads(norm))
    pixels, probs = [], []

    def floats(batch):  # uint8 [B, H, W(, C)] -> float32 [B, C, H, W], normalised in place
        x = torch.from_numpy(batch).reshape(len(batch), *batch.shape[1:3], channels)
        return x.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)

    with torch.inference_mode():
        for lo in range(0, len(blobs), 256):
            batch = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert(mode))
                              for b in blobs[lo:lo + 256]])
            pixels.append(batch)
            probs.append(torch.softmax(s(floats(batch)), -1))
        p = torch.cat(probs)
        top2 = p.topk(2, -1).values
        score = 1 - (top2[:, 0] - top2[:, 1])
        conf, label = p.max(-1)
        hard = np.flatnonzero(score.numpy() > np.quantile(score.numpy(), 1 - RATE))
        allpix = np.concatenate(pixels)
        for lo in range(0, len(hard), 256):
            rows = hard[lo:lo + 256]
            conf[rows], label[rows] = torch.softmax(t(floats(allpix[rows])), -1).max(-1)
    source = np.full(len(blobs), "student", object)
    source[hard] = "teacher"
    out_table = table.append_column("label", pa.array(label.numpy())) \
        .append_column("confidence", pa.array(conf.numpy())) \
        .append_column("deferral_score", pa.array(score.numpy())) \
        .append_column("source", pa.array(source, pa.string()))
    pq.write_table(out_table, out)


# ---------------------------------------------------------------------------- timed sides

def titans_flags(kind: str, data: str, models, out: str) -> list[str]:
    mode, (mean, std) = KINDS[kind]
    norm = [] if kind == "png28" else ["--image-mean", ",".join(map(str, mean)),
                                       "--image-std", ",".join(map(str, std))]
    return ["--input", data, "--output", out, "--student", models[0], "--teacher", models[1],
            "--image-column", "image", "--image-mode", mode, "--deferral-rate", str(RATE),
            "--overwrite", *norm]


def check_titans(out: str, rows: int) -> None:
    report = json.load(open(os.path.join(out, "report.json")))
    if report["rows_in"] != rows or report["rows_dead_letter"]:
        raise SystemExit(f"titans into {out}: {report['rows_in']} rows in, "
                         f"{report['rows_dead_letter']} dead-lettered; expected {rows} and 0")


def run_kind(args, kind: str, rows: int) -> dict:
    import pyarrow.parquet as pq

    w = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    data, models = make_data(args.workdir, kind, rows), make_models(args.workdir, kind)
    mode, norm = KINDS[kind]
    norm_json = json.dumps(norm)
    sides = {"loop": throughput.Runs(f"(loop) one-thread Pillow cascade, {kind}"),
             "titans": throughput.Runs(f"(titans) titans run, {kind}")}
    if args.base_ref:
        sides["base"] = throughput.Runs(f"(base) titans run of {args.base_ref}, {kind}")
    for r in range(args.runs):
        out = w(f"{kind}-loop-out.parquet")
        sides["loop"].add(throughput.timed([sys.executable, __file__, "loop", data, *models, mode,
                                            norm_json, out]))
        if pq.ParquetFile(out).metadata.num_rows != rows:
            raise SystemExit(f"the loop wrote the wrong number of rows into {out}")
        out = w(f"{kind}-titans-out")
        sides["titans"].add(throughput.timed(TITANS + titans_flags(kind, data, models, out)),
                            os.path.join(out, "report.json"))
        check_titans(out, rows)
        if args.base_ref:
            out = w(f"{kind}-base-out")
            sides["base"].add(throughput.timed(throughput.base_titans(args.base_ref, args.workdir)
                                               + titans_flags(kind, data, models, out)),
                              os.path.join(out, "report.json"))
            check_titans(out, rows)
        print(f"  {kind} round {r + 1}/{args.runs}: " + ", ".join(
            f"{k} {v.seconds[-1]:.2f} s" for k, v in sides.items()), file=sys.stderr, flush=True)
    return sides


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "loop":
        return loop(*sys.argv[2:8])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5,
                    help="interleaved runs of every side; medians count; default %(default)s")
    ap.add_argument("--png-rows", type=int, default=100_000, help="rows of png28; default %(default)s")
    ap.add_argument("--jpeg-rows", type=int, default=6_000, help="rows of jpeg224; default %(default)s")
    ap.add_argument("--only", choices=("png28", "jpeg224", "all"), default="all",
                    help="run one workload only; default %(default)s")
    ap.add_argument("--base-ref", metavar="REV",
                    help="also time `titans run` of this git commit, interleaved")
    ap.add_argument("--workdir", default="benchmarks/out/image_cascade",
                    help="data, models (cached) and outputs; default %(default)s")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    import PIL
    import torch
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start; torch {torch.__version__}, Pillow "
          f"{PIL.__version__}; deferral rate {RATE}; whole processes, {args.runs} interleaved "
          f"runs per side, medians (min-max)", flush=True)
    for kind, rows in (("png28", args.png_rows), ("jpeg224", args.jpeg_rows)):
        if args.only not in (kind, "all"):
            continue
        sides = run_kind(args, kind, rows)
        print(f"\n== {kind}: {rows:,} rows, {os.path.getsize(make_data(args.workdir, kind, rows)) / 2**20:.1f} "
              f"MiB of encoded images in one Parquet file")
        for name, runs in sides.items():
            print(runs.line(rows) + f"  ({rows / max(runs.seconds):,.0f}-{rows / min(runs.seconds):,.0f} rows/s)")
            if runs.phase_line():
                print(runs.phase_line())
        loop_med = sides["loop"].median
        target = 1.0 if kind == "png28" else 0.8
        for name in [k for k in sides if k != "loop"]:
            ratio = loop_med / sides[name].median
            print(f"{kind}: {name}/loop rows/s = {ratio:.2f}   (target >= {target}: "
                  f"{'met' if ratio >= target else 'not met'})")


if __name__ == "__main__":
    main()
