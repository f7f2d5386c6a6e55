"""A RunInference ModelHandler whose examples are Arrow tables, not rows.

Each example is a whole table (up to ``batch_size`` rows), so RunInference keeps its
model sharing, metrics and batching (BatchElements merges small tables up to
``batch_size`` rows via ``element_size_fn``) without one Python object per row.

One bad row never takes its batch with it: rows whose features cannot be read, and rows
the model raises on (found by splitting the batch, see ``isolate_failures``), get a reason
in the ``ERROR`` column and the stage in ``ERROR_STAGE``; the split routes them to the dead
letter. What the model's output means is left to ``annotate(table, logits, errors)``,
which may add errors of its own (a non-finite output, say).

Only failures that single out rows are the rows' fault. The bundle fails instead, for the
runner to retry (and, once its retries run out, the job fails) on an infrastructure error
(``models.forward.is_infrastructure``: a lost model server, MemoryError, a CUDA error) and
on a model that fails on the whole batch and on every row tried alone (``EveryRowFailed``).
Any other error of this handler is a ``BatchFailed``, the one exception RunInference's dead
letter takes (``with_exception_handling(exc_class=BatchFailed)``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from titans.models.forward import (forward_in_chunks, is_infrastructure, isolate_failures,
                                   short_error)
from titans.models.loading import ModelRef, resolve_device
from titans.transforms.dead_letter import VALIDATE
from titans.transforms.io.models import load_model_file
from titans.transforms.labels import ERROR, ERROR_STAGE, RowErrors
from titans.transforms.overlap import slices_ahead

_LOG = logging.getLogger("titans")

# annotate(table, logits [rows, outputs], errors) -> table with the model's columns; errors
# (labels.RowErrors) it may add to; rows with an error have no meaningful logits and are
# dropped later.
Annotate = Callable[[pa.Table, np.ndarray, RowErrors], pa.Table]


@dataclasses.dataclass
class LoadedModel:
    module: torch.nn.Module
    device: str
    progress: "Progress"
    forward_rows: int | None = None  # rows per forward when not batch_size (see forward)


class BatchFailed(Exception):
    """An error of this handler outside the model's forward, on one batch: its rows go to the
    dead letter with it (RunInference's exception handling catches only this)."""


class EveryRowFailed(RuntimeError):
    """The model failed on a batch and on every row tried alone: a broken model (or device),
    not bad rows. It fails the bundle, so the runner retries it and then fails the job."""


def num_rows(table: pa.Table) -> int:
    return table.num_rows


class ArrowModelHandler(ModelHandler[pa.Table, pa.Table, LoadedModel]):
    def __init__(self, model: ModelRef, features, annotate: Annotate, *,
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
        if self.one_copy_per_worker(device):
            return self.load_worker_copy(device)
        module = load_model_file(self._model, device)
        where = device
        if device.startswith("cuda"):
            where = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        _LOG.info("%s model %s loaded on %s", self._name, self._model.path, where)
        # images on this process's CPU: chunks that keep the activations in cache (not on a
        # GPU, nor on the worker's shared copy, where a forward's fixed cost is larger)
        rows = getattr(self._features, "forward_rows", None)
        rows = rows(self._batch_size) if rows is not None and device == "cpu" else None
        return LoadedModel(module, device, Progress(self._name), rows)

    def run_inference(self, batch: Sequence[pa.Table], model: LoadedModel,
                      inference_args=None) -> list[pa.Table]:
        try:
            return self._run(batch, model)
        except EveryRowFailed:
            raise
        except Exception as e:  # noqa: BLE001 - sorted: the machine's fault or the batch's
            if is_infrastructure(e):
                raise
            raise BatchFailed(short_error(e)) from e

    def _run(self, batch: Sequence[pa.Table], model: LoadedModel) -> list[pa.Table]:
        merged = pa.concat_tables(batch) if len(batch) > 1 else batch[0]
        n = merged.num_rows
        errors = RowErrors(n)
        # images: decoded in slices, the next one on a background thread while the model
        # runs on this one; other features are one slice (their matrix is a cheap view)
        parts = [(lo, self._score(model, x, reasons, errors, lo)) for lo, (x, reasons) in
                 slices_ahead(merged, self._features.matrix, self._features.slice_rows(n))]
        width = max(p.shape[1] for _, p in parts)
        if len(parts) == 1 and parts[0][1].shape[1] == width:
            logits = parts[0][1]
        else:
            logits = np.full((n, width), np.nan, np.float32)
            for lo, p in parts:
                if p.shape[1]:
                    logits[lo:lo + len(p)] = p
        out, start = [], 0
        for table in batch:
            end = start + table.num_rows
            part = errors.slice(start, end)
            annotated = self._annotate(table, logits[start:end], part)
            error, stage = part.columns()
            out.append(annotated.append_column(ERROR, error).append_column(ERROR_STAGE, stage))
            start = end
        unreadable = 0 if errors.stages is None else int((errors.stages == VALIDATE).sum())
        Metrics.counter("titans", f"{self._name}_rows").inc(n - unreadable)
        model.progress.add(n)
        return out

    def _score(self, model: LoadedModel, x: np.ndarray, reasons, errors: RowErrors,
               lo: int) -> np.ndarray:
        """Logits [len(x), outputs] of rows lo.. of the batch (NaN where a row has no score;
        [len(x), 0] when none has); their errors go into ``errors``."""
        n = len(x)
        if reasons is not None:
            unreadable = np.array([r is not None for r in reasons], bool)
            errors.add(lo + np.flatnonzero(unreadable), reasons[unreadable], VALIDATE)
            valid = np.flatnonzero(~unreadable)
        else:
            valid = None  # every row
        logits = np.full((n, 0), np.nan, np.float32)
        if valid is None or len(valid):
            rows = x if valid is None else x[valid]
            scored, failed = isolate_failures(lambda xb: self.forward(model, xb), rows)
            if scored is None and len(rows) > 1:  # one row alone cannot tell model from row
                raise EveryRowFailed(f"{self._name} model failed on a batch of {len(rows)} rows "
                                     f"and on each row tried alone: {next(iter(failed.values()))}")
            if scored is not None and valid is None:
                logits = scored
            elif scored is not None:
                logits = np.full((n, scored.shape[1]), np.nan, np.float32)
                logits[valid] = scored
            for i, why in failed.items():
                errors.add(lo + (i if valid is None else valid[i]),
                           f"{self._name} model failed on this row: {why}", self._name)
        return logits

    def forward(self, model: LoadedModel, x: np.ndarray) -> np.ndarray:
        """float32 logits [rows, outputs] of the model, at most batch_size rows per forward."""
        y = forward_in_chunks(model.module, x, self.forward_chunk(model), model.device)
        if y.dim() != 2 or y.shape[0] != len(x):
            raise ValueError(f"expected logits [{len(x)}, classes], got {tuple(y.shape)}")
        Metrics.counter("titans", f"{self._name}_forward_calls").inc(-(-len(x) // self.forward_chunk(model)))
        return y.numpy()

    def forward_chunk(self, model: LoadedModel) -> int:
        """Rows per forward pass of ``model``."""
        return model.forward_rows or self._batch_size

    def get_num_bytes(self, batch: Sequence[pa.Table]) -> int:
        # the default pickles every batch just to measure it
        return sum(t.nbytes for t in batch)

    def get_metrics_namespace(self) -> str:
        return f"titans_{self._name}"

    def get_resource_hints(self) -> dict:
        # hints set here apply to the inference ParDo only (not BatchElements around it)
        return dict(self._hints)

    # One model per GPU. Dataflow starts one SDK process per vCPU and each would load its own
    # copy onto the worker's GPU (four teachers on a g2-standard-4's one L4). On cuda the
    # model is loaded once per worker VM instead, in a process that Beam's MultiProcessShared
    # serves (what RunInference's large_model/model_copies hooks use); every SDK process sends
    # it CPU tensors and gets CPU logits back. The hooks themselves (share_model_across_
    # processes, model_copies) stay off: with them RunInference hands run_inference a proxy
    # of LoadedModel, and a proxy forwards method calls, not the fields (device, module,
    # progress) run_inference reads. So the sharing is one level down, on the torch module.
    def one_copy_per_worker(self, device: str) -> bool:
        """Whether this worker's SDK processes share one copy of the model: on a GPU."""
        return device.startswith("cuda")

    def load_worker_copy(self, device: str) -> LoadedModel:
        """The model as this worker's shared copy on ``device``: LoadedModel's device is
        'cpu' because what this process sends and receives are CPU tensors."""
        from apache_beam.utils.multi_process_shared import MultiProcessShared

        key = f"{self._name}|{self._model.path}|{device}".encode()
        tag = f"titans-{self._name}-{hashlib.sha1(key).hexdigest()[:16]}"
        module = MultiProcessShared(functools.partial(DeviceModel, self._model, device), tag=tag,
                                    always_proxy=True).acquire()
        _LOG.info("%s model %s: this process uses the worker's one copy on %s", self._name,
                  self._model.path, device)
        return LoadedModel(module, "cpu", Progress(self._name))


class DeviceModel:
    """A model on ``device`` that takes and returns CPU tensors: the one copy a worker's SDK
    processes share (``ArrowModelHandler.load_worker_copy``)."""

    def __init__(self, ref: ModelRef, device: str):
        self._module = load_model_file(ref, device)
        self._device = device
        where = device
        if device.startswith("cuda"):
            where = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        _LOG.info("model %s loaded on %s, shared by this worker's processes", ref.path, where)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            y = self._module(x.to(self._device, non_blocking=True))
        if not isinstance(y, torch.Tensor):  # forward names the shape problem; ship no GPU data
            raise ValueError(f"expected logits [{len(x)}, classes], got {type(y).__name__}")
        return y.float().cpu()


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
