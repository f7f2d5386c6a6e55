"""A RunInference ModelHandler whose examples are Arrow tables, not rows.

Each example is a whole table (up to ``batch_size`` rows), so RunInference keeps its
model sharing, metrics and batching (BatchElements merges small tables up to
``batch_size`` rows via ``element_size_fn``) without one Python object per row.

One bad row never takes its batch with it: rows whose features cannot be read, and rows
the model raises on (found by splitting the batch, see ``isolate_failures``), get a reason
in the ``ERROR`` column and the stage in ``ERROR_STAGE``; the split routes them to the dead
letter. What the model's output means is left to ``annotate(table, logits, errors)``,
which may add errors of its own (a non-finite output, say).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from titans.models.loading import ModelRef, resolve_device
from titans.transforms.dead_letter import VALIDATE
from titans.transforms.features import FeatureSpec, as_tensor, feature_matrix
from titans.transforms.labels import ERROR, ERROR_STAGE

_LOG = logging.getLogger("titans")

# annotate(table, logits [rows, outputs], errors) -> table with the model's columns; errors
# is an object array (None = fine) it may add reasons to; rows with an error have no
# meaningful logits and are dropped later.
Annotate = Callable[[pa.Table, np.ndarray, np.ndarray], pa.Table]


def short_error(e: BaseException) -> str:
    """``Type: message`` on one line. TorchScript wraps the model's own error in a trace of
    many lines whose last line is the error itself; Python errors start with it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if "TorchScript" in lines[0] or lines[0].startswith("The following operation failed"):
        return lines[-1]
    return f"{type(e).__name__}: {lines[0]}"


def isolate_failures(forward: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                     probes: int = 3) -> tuple[np.ndarray | None, dict[int, str]]:
    """(outputs for every row, NaN where the row failed; {row: error}) for ``forward`` over
    ``x``, finding the rows ``forward`` raises on.

    One forward when nothing fails. Otherwise a few single rows spread over the batch are
    tried first: if all of them fail too, the model is broken (or the batch wholly bad) and
    every row gets the error, for ``probes`` extra forwards. If not, the batch is split in
    halves, recursively, down to the failing rows: about 2 k log2(n) extra forwards for k
    bad rows. Outputs are None when no row succeeded.
    """
    n = len(x)
    try:
        return forward(x), {}
    except Exception as e:  # noqa: BLE001 - any model failure is isolated, not fatal
        first = short_error(e)
    if n == 1:
        return None, {0: first}
    out: np.ndarray | None = None

    def run(lo: int, hi: int) -> str | None:
        nonlocal out
        try:
            y = forward(x[lo:hi])
        except Exception as e:  # noqa: BLE001
            return short_error(e)
        if out is None:
            out = np.full((n, *y.shape[1:]), np.nan, dtype=np.float32)
        out[lo:hi] = y
        return None

    tried = sorted({int(i) for i in np.linspace(0, n - 1, min(probes, n))})
    probe_errors = {i: run(i, i + 1) for i in tried}
    if all(probe_errors.values()):
        why = f"{first} (the model also failed on each of {len(tried)} rows tried alone)"
        return None, {i: why for i in range(n)}
    errors: dict[int, str] = {}
    stack = [(0, n)]
    while stack:
        lo, hi = stack.pop()
        if hi - lo == 1 and lo in probe_errors:
            if probe_errors[lo]:
                errors[lo] = probe_errors[lo]
            continue
        error = run(lo, hi) if (lo, hi) != (0, n) else first
        if error is None:
            continue
        if hi - lo == 1:
            errors[lo] = error
        else:
            mid = (lo + hi) // 2
            stack += [(mid, hi), (lo, mid)]
    return out, errors


@dataclasses.dataclass
class LoadedModel:
    module: torch.nn.Module
    device: str
    progress: "Progress"


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
        return LoadedModel(module, device, Progress(self._name))

    def run_inference(self, batch: Sequence[pa.Table], model: LoadedModel,
                      inference_args=None) -> list[pa.Table]:
        parts = [feature_matrix(t, self._features) for t in batch]
        x = np.concatenate([m for m, _ in parts]) if len(parts) > 1 else parts[0][0]
        errors = np.full(len(x), None, dtype=object)
        stages = np.full(len(x), None, dtype=object)
        offsets = np.cumsum([0] + [t.num_rows for t in batch])
        for (_, reasons), start in zip(parts, offsets):
            if reasons is not None:
                errors[start:start + len(reasons)] = reasons
        stages[errors != None] = VALIDATE  # noqa: E711 - elementwise on an object array
        valid = np.flatnonzero(errors == None)  # noqa: E711
        logits = np.full((len(x), 0), np.nan, np.float32)
        if len(valid):
            scored, failed = isolate_failures(lambda xb: self.forward(model, xb),
                                              x[valid] if len(valid) < len(x) else x)
            if scored is not None:
                logits = np.full((len(x), scored.shape[1]), np.nan, np.float32)
                logits[valid] = scored
            for i, why in failed.items():
                errors[valid[i]] = f"{self._name} model failed on this row: {why}"
                stages[valid[i]] = self._name
        out = []
        for table, start, end in zip(batch, offsets[:-1], offsets[1:]):
            part_errors = errors[start:end].copy()
            annotated = self._annotate(table, logits[start:end], part_errors)
            part_stages = stages[start:end]
            part_stages[(part_errors != None) & (part_stages == None)] = self._name  # noqa: E711
            out.append(annotated.append_column(ERROR, _strings(part_errors))
                       .append_column(ERROR_STAGE, _strings(part_stages)))
        Metrics.counter("titans", f"{self._name}_rows").inc(len(valid))
        model.progress.add(len(x))
        return out

    def forward(self, model: LoadedModel, x: np.ndarray) -> np.ndarray:
        """float32 logits for a float32 matrix, in chunks of at most batch_size rows."""
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(x), self._batch_size):
                xb = as_tensor(x[start:start + self._batch_size])
                if model.device != "cpu":
                    xb = xb.to(model.device, non_blocking=True)
                y = model.module(xb)
                if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != len(xb):
                    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise ValueError(f"expected logits [{len(xb)}, classes], got {shape}")
                chunks.append(y.float().cpu().numpy())
                Metrics.counter("titans", f"{self._name}_forward_calls").inc()
        return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]

    def get_num_bytes(self, batch: Sequence[pa.Table]) -> int:
        # the default pickles every batch just to measure it
        return sum(t.nbytes for t in batch)

    def get_metrics_namespace(self) -> str:
        return f"titans_{self._name}"

    def get_resource_hints(self) -> dict:
        # hints set here apply to the inference ParDo only (not BatchElements around it)
        return dict(self._hints)


def _strings(values: np.ndarray) -> pa.Array:
    if (values == None).all():  # noqa: E711 - the common case: no row in error
        return pa.nulls(len(values), pa.string())
    return pa.array(values, pa.string())


class Progress:
    """Rows and rows/s of one model in the log, at most every ``every`` seconds; one per
    loaded model, so each run (and each worker) counts from its own start."""

    def __init__(self, name: str, every: float = 5.0):
        self._name = name
        self._every = every
        self._lock = threading.Lock()
        self._start = self._last = time.monotonic()
        self._total = 0

    def add(self, rows: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._total += rows
            if now - self._last < self._every:
                return
            self._last = now
            total, rate = self._total, self._total / max(now - self._start, 1e-9)
        _LOG.info("%s: %s rows scored (%s rows/s in this worker)", self._name, f"{total:,}",
                  f"{rate:,.0f}")
