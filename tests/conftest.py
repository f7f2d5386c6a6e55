"""Shared fixtures: real Parquet files and real TorchScript models in a temp dir."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from titans.models.architectures import MLP
from titans.transforms.io.models import save_torchscript

DIM, CLASSES = 8, 4
# The in-process runner, named explicitly: the DirectRunner would first try to download Prism.
RUNNER = ["--runner", "FnApiRunner"]


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path, monkeypatch):
    """Every test starts with an empty titans cache (the teacher FLOPs `titans label`
    counts once per teacher file): no test sees what an earlier one counted."""
    monkeypatch.setenv("TITANS_CACHE_DIR", str(tmp_path / "titans-cache"))


def features_table(ids: np.ndarray, x: np.ndarray, fixed: bool = True) -> pa.Table:
    values = pa.array(x.reshape(-1).astype(np.float32))
    vec = (pa.FixedSizeListArray.from_arrays(values, x.shape[1]) if fixed else
           pa.ListArray.from_arrays(pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32)), values))
    return pa.table({"id": pa.array(ids, pa.int64()), "features": vec,
                     "note": pa.array([f"row {i}" for i in ids])})


def write_dataset(directory, n: int, files: int = 2, row_group_size: int = 700, seed: int = 0):
    """``files`` Parquet files with ``n`` rows in total: id, features (fixed-size list), note."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    bounds = np.linspace(0, n, files + 1).astype(int)
    for i in range(files):
        ids = np.arange(bounds[i], bounds[i + 1])
        pq.write_table(features_table(ids, x[ids]), os.path.join(directory, f"part-{i}.parquet"),
                       row_group_size=row_group_size)
    return x


def save_models(directory, seed: int = 0) -> tuple[str, str]:
    torch.manual_seed(seed)
    student, teacher = os.path.join(directory, "student.pt"), os.path.join(directory, "teacher.pt")
    save_torchscript(MLP(DIM, CLASSES, (6,)), student)
    save_torchscript(MLP(DIM, CLASSES, (32, 32)), teacher)
    return student, teacher


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train faster on one intra-op thread (4x here, on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def models(tmp_path):
    return save_models(tmp_path)


@pytest.fixture
def dataset(tmp_path):
    directory = tmp_path / "data"
    x = write_dataset(directory, 3000)
    return str(directory), x


def read_labels(output) -> pa.Table:
    return pq.read_table(os.path.join(output, "labels")).sort_by("id")


def logits_of(model_path: str, x: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return torch.jit.load(model_path)(torch.from_numpy(x.astype(np.float32)))


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
    """gs://titans-test on a real GCS JSON API served on localhost (gcp-storage-emulator), for
    this test session; STORAGE_EMULATOR_HOST points Beam's GCS client (and subprocesses) at it."""
    import shutil
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("gcp-storage-emulator") or os.path.join(os.path.dirname(sys.executable),
                                                               "gcp-storage-emulator")
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
    server = subprocess.Popen([exe, "start", "--host", "127.0.0.1", "--port", str(port),
                               "--default-bucket", "titans-test", "--in-memory", "--quiet"],
                              stdout=log, stderr=log)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"the GCS emulator did not start; see {log.name}")
            time.sleep(0.1)
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    yield "gs://titans-test"
    server.terminate()
    server.wait(timeout=10)
    log.close()
    if before is None:
        del os.environ["STORAGE_EMULATOR_HOST"]
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = before


def upload(local_dir, url: str) -> str:
    """Copy every file below ``local_dir`` to the object prefix ``url``; returns ``url``."""
    from titans.transforms.io import storage

    for d, _, files in os.walk(local_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), local_dir)
            with open(os.path.join(d, f), "rb") as fh:
                storage.write_bytes(storage.join(url, *rel.split(os.sep)), fh.read())
    return url


def read_parquet_under(url: str) -> pa.Table:
    """Every Parquet file below the prefix ``url`` (local or gs://), concatenated."""
    from titans.transforms.io import storage

    tables = [pq.read_table(storage.open_read(p)) for p in storage.list_under(url)
              if p.endswith(".parquet")]
    return pa.concat_tables(tables) if tables else None
