"""deploy/gpu_check.py --smoke: the GPU check itself runs (CPU only, small sizes, seconds),
through Beam's in-process runner with titans' ArrowModelHandler and TeacherLabels, and
reports rows/s, the device the model's parameters were on in every batch, and the ratio."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_the_teacher_stage():
    done = subprocess.run([sys.executable, str(ROOT / "deploy" / "gpu_check.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "teacher: MLP 64-512-512-10" in out and "runner FnApiRunner" in out
    # torch's CUDA build, the driver and the card's raw speed, before titans' own figures
    assert re.search(r"^driver: .+; torch\.version\.cuda: \S+$", out, re.M), out
    mm = re.search(r"^matmul on cpu: 512x512 float32 in [\d.]+ ms \(([\d.]+) TFLOP/s\)$", out, re.M)
    assert mm and float(mm.group(1)) > 0, out
    stage = re.search(r"teacher stage on cpu\s*:\s*([\d,]+) rows/s \(8,192 rows", out)
    bare = re.search(r"bare torch loop on cpu\s*:\s*([\d,]+) rows/s", out)
    assert stage and bare, out
    assert int(stage.group(1).replace(",", "")) > 0 and int(bare.group(1).replace(",", "")) > 0
    # every batch of the stage ran with the loaded model's parameters on the asked device
    assert "model parameters on cpu in 8 of 8 batches" in out
    assert re.search(r"ratio stage/bare on cpu: \d+\.\d\d \(target >= 0\.8\)", out)
    assert "loaded on cpu" in done.stderr  # titans' own log line from the handler
