"""Shared fixtures: real Parquet files and real TorchScript models in a temp dir."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from titans.models.architectures import MLP
from titans.models.loading import save_torchscript

DIM, CLASSES = 8, 4
# The in-process runner, named explicitly: the DirectRunner would first try to download Prism.
RUNNER = ["--runner", "FnApiRunner"]


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
