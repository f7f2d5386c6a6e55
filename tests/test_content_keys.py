"""Content keys (pipeline/content_keys.py): what says that a file or a model is the version a
job used. Size and time are not enough: a rewrite can keep both."""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import torch

from conftest import DIM, features_table
from titans.models.architectures import MLP
from titans.pipeline import content_keys


def _write(path, seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(300, DIM)).astype(np.float32)
    pq.write_table(features_table(np.arange(1000, 1300), x), path, compression="none")


def test_a_parquet_file_rewritten_with_the_same_size_and_time_gets_another_key(tmp_path):
    path = tmp_path / "part-0.parquet"
    _write(path, 1)
    before = content_keys.file_keys([str(path)])[str(path)]
    stat = os.stat(path)
    _write(path, 2)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size  # same size, same time: only the bytes differ
    after = content_keys.file_keys([str(path)])[str(path)]
    assert (after["size"], after["mtime"]) == (before["size"], before["mtime"])
    assert after != before and content_keys.changes(before, after) == ["footer_sha256"]
    assert content_keys.file_keys([str(path)])[str(path)] == after  # stable


def test_a_model_key_is_the_sha256_of_its_bytes(tmp_path):
    path = str(tmp_path / "teacher.pt")
    torch.manual_seed(0)
    torch.save(MLP(DIM, 4, (32,)).state_dict(), path)
    first = content_keys.model_key(path)
    import hashlib

    assert first["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    torch.manual_seed(1)
    torch.save(MLP(DIM, 4, (32,)).state_dict(), path)  # same architecture: same size
    second = content_keys.model_key(path)
    assert second["size"] == first["size"] and second["sha256"] != first["sha256"]


def test_a_gcs_object_rewritten_with_the_same_bytes_gets_another_key(tmp_path, gcs_bucket):
    """On GCS the key carries the object's generation: every upload is a new one, whatever
    its size and content."""
    from titans.transforms.io import storage

    local = tmp_path / "part-0.parquet"
    _write(local, 1)
    url = f"{gcs_bucket}/content-keys/part-0.parquet"
    storage.write_bytes(url, local.read_bytes())
    before = content_keys.file_keys([url])[url]
    assert before["size"] == os.path.getsize(local) and before["generation"]
    storage.write_bytes(url, local.read_bytes())  # the very same bytes, uploaded again
    after = content_keys.file_keys([url])[url]
    assert after["size"] == before["size"]
    assert after["generation"] != before["generation"] and after != before
    assert "generation" in content_keys.changes(before, after)
