"""A RunInference ModelHandler whose examples are Arrow tables, not rows.

Each example is a whole table (up to ``batch_size`` rows), so RunInference keeps its
model sharing, metrics and batching (BatchElements merges small tables up to
``batch_size`` rows via ``element_size_fn``) without one Python object per row.
What the model's output means is left to ``annotate(table, logits, reasons) -> table``.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from titans.models.loading import ModelRef, resolve_device
from titans.transforms.features import FeatureSpec, as_tensor, feature_matrix

_LOG = logging.getLogger("titans")

Annotate = Callable[[pa.Table, torch.Tensor, Optional[np.ndarray]], pa.Table]


@dataclasses.dataclass
class LoadedModel:
    module: torch.nn.Module
    device: str


def num_rows(table: pa.Table) -> int:
    return table.num_rows


class ArrowModelHandler(ModelHandler[pa.Table, pa.Table, LoadedModel]):
    def __init__(self, model: ModelRef, features: FeatureSpec, annotate: Annotate, *,
                 batch_size: int, name: str, resource_hints: dict | None = None):
        # min == max: BatchElements then merges tables up to exactly batch_size rows
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size,
                         element_size_fn=num_rows)
        self._model = model
        self._features = features
        self._annotate = annotate
        self._batch_size = batch_size
        self._name = name
        self._hints = dict(resource_hints or {})

    def load_model(self) -> LoadedModel:
        device = resolve_device(self._model.device)  # raises rather than silently using the CPU
        module = self._model.load(device)
        where = device
        if device.startswith("cuda"):
            where = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        _LOG.info("%s model %s loaded on %s", self._name, self._model.path, where)
        return LoadedModel(module, device)

    def run_inference(self, batch: Sequence[pa.Table], model: LoadedModel,
                      inference_args=None) -> list[pa.Table]:
        parts = [feature_matrix(t, self._features) for t in batch]
        x = np.concatenate([m for m, _ in parts]) if len(parts) > 1 else parts[0][0]
        logits = self.forward(model, x)
        out, start = [], 0
        for table, (_, reasons) in zip(batch, parts):
            end = start + table.num_rows
            out.append(self._annotate(table, logits[start:end], reasons))
            start = end
        Metrics.counter("titans", f"{self._name}_rows").inc(len(x))
        _progress(self._name, len(x))
        return out

    def forward(self, model: LoadedModel, x: np.ndarray) -> torch.Tensor:
        """Logits on the CPU for a float32 matrix, in chunks of at most batch_size rows."""
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(x), self._batch_size):
                xb = as_tensor(x[start:start + self._batch_size])
                if model.device != "cpu":
                    xb = xb.to(model.device, non_blocking=True)
                chunks.append(model.module(xb).float().cpu())
                Metrics.counter("titans", f"{self._name}_forward_calls").inc()
        if not chunks:
            return torch.empty((0, 0))
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def get_num_bytes(self, batch: Sequence[pa.Table]) -> int:
        # the default pickles every batch just to measure it
        return sum(t.nbytes for t in batch)

    def get_metrics_namespace(self) -> str:
        return f"titans_{self._name}"

    def get_resource_hints(self) -> dict:
        # hints set here apply to the inference ParDo only (not BatchElements around it)
        return dict(self._hints)


class _Progress:
    """Rows and rows/s per stage in the log, at most every ``every`` seconds per process."""

    def __init__(self, every: float = 5.0):
        self._every = every
        self._lock = threading.Lock()
        self._state: dict[str, list] = {}

    def __call__(self, name: str, rows: int):
        now = time.monotonic()
        with self._lock:
            start, total, last = self._state.setdefault(name, [now, 0, now])
            total += rows
            self._state[name][1] = total
            if now - last >= self._every:
                self._state[name][2] = now
                _LOG.info("%s: %s rows scored (%s rows/s in this worker)", name,
                          f"{total:,}", f"{total / max(now - start, 1e-9):,.0f}")


_progress = _Progress()
