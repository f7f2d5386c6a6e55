"""The teacher's FLOPs per row, counted once per teacher file and input shape.

Counting them runs the teacher under torch's FlopCounterMode, whose first use imports
torch._dynamo: ~0.8 s of every `titans label` launch (measured on 2 CPUs), for a number that
only changes with the teacher's bytes. So it is kept in a small JSON file keyed by the
teacher's SHA-256 (which the job takes anyway, for its phase keys) and the input's shape:
``$TITANS_CACHE_DIR`` or ``~/.cache/titans``. A cache that cannot be read or written is only
a cache: the count is made again, the job goes on.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from titans.models.student_search import flops_per_row
from titans.transforms.io import storage

_LOG = logging.getLogger("titans")
FILE = "teacher_flops.json"


def cache_path() -> str:
    base = os.environ.get("TITANS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "titans")
    return os.path.join(base, FILE)


def teacher_flops(teacher, x: np.ndarray, teacher_sha256: str | None) -> tuple[float, str, int]:
    """(FLOPs per row, the proxy that measured them, teacher rows run to count them: 0 when
    the cache had them)."""
    key = f"{teacher_sha256}:{list(x.shape[1:])}:{x.dtype}" if teacher_sha256 else None
    path = cache_path()
    cached = _read(path)
    if key is not None and isinstance(cached.get(key), list) and len(cached[key]) == 2:
        flops, proxy = cached[key]
        return float(flops), str(proxy), 0
    flops, proxy = flops_per_row(teacher, x)
    if key is not None:
        _write(path, {**cached, key: [flops, proxy]})
    return flops, proxy, len(x)


def _read(path: str) -> dict:
    try:
        data = storage.read_json(path)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: str, data: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        storage.write_json(path, data)  # whole or not at all: written beside, then renamed
    except OSError as e:
        _LOG.info("teacher FLOPs not cached (%s): counted again next time", e)
