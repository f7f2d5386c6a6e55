"""A model over a whole feature matrix: a bounded number of rows per forward pass, and the
rows it fails on found without giving up the others."""
from __future__ import annotations

import re
import warnings
from typing import Callable

import numpy as np
import torch


def forward_in_chunks(module, x: np.ndarray, chunk: int, device: str = "cpu") -> torch.Tensor:
    """Logits (float32, on the CPU) of ``module`` on every row of ``x`` (float32 features or
    images, int64 token ids), ``chunk`` rows per forward, without autograd. Chunks go to
    ``device`` and the logits come back.

    An empty ``x`` gives an empty [0, 0] tensor (the width is unknown without a forward).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating) and x.dtype != np.float32:
        x = x.astype(np.float32)  # token ids (int64) stay integers
    parts = []
    with torch.inference_mode(), warnings.catch_warnings():
        # Arrow-backed matrices are read-only; the model only reads its input
        warnings.simplefilter("ignore", UserWarning)
        for start in range(0, len(x), chunk):
            xb = torch.from_numpy(x[start:start + chunk])
            if device != "cpu":
                xb = xb.to(device, non_blocking=True)
            parts.append(module(xb).float().cpu())
    if not parts:
        return torch.empty((0, 0))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def short_error(e: BaseException) -> str:
    """``Type: message`` on one line. TorchScript wraps the model's own error in a trace of
    many lines whose last line is the error itself; Python errors start with it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if "TorchScript" in lines[0] or lines[0].startswith("The following operation failed"):
        return lines[-1]
    return f"{type(e).__name__}: {lines[0]}"


# a RuntimeError of the device, not of the rows (a CUDA error, cuBLAS/cuDNN, NCCL)
_DEVICE_ERROR = re.compile(r"\bCUDA\b|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|NCCL|device-side assert")


def is_infrastructure(e: BaseException) -> bool:
    """Whether ``e`` is the machine's fault, not the rows': a lost connection (a
    MultiProcessShared model server gone: EOFError, BrokenPipeError, ConnectionError), memory
    (MemoryError), a CUDA error. Such errors must fail the bundle so the runner retries it
    elsewhere or later, never send rows to the dead letter. A CUDA out-of-memory error is not
    one: a smaller batch fits, so ``isolate_failures`` splits the batch."""
    if isinstance(e, torch.OutOfMemoryError):
        return False
    if isinstance(e, (ConnectionError, EOFError, MemoryError, TimeoutError)):
        return True
    accelerator = getattr(torch, "AcceleratorError", None)  # torch's CUDA errors (>= 2.8)
    if accelerator is not None and isinstance(e, accelerator):
        return True
    if isinstance(e, RuntimeError):
        text = str(e)
        return bool(_DEVICE_ERROR.search(text)) and "out of memory" not in text
    return False


def isolate_failures(forward: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                     probes: int = 3) -> tuple[np.ndarray | None, dict[int, str]]:
    """(outputs for every row, NaN where the row failed; {row: error}) for ``forward`` over
    ``x``, finding the rows ``forward`` raises on.

    One forward when nothing fails. Otherwise a few single rows spread over the batch are
    tried first: if all of them fail too, the model is broken (or the batch wholly bad) and
    every row gets the error, for ``probes`` extra forwards; outputs are then None, and a
    caller that runs a job fails the batch rather than dead-letter it (only failures that
    single out rows are the rows' fault). If not, the batch is split in halves, recursively,
    down to the failing rows: about 2 k log2(n) extra forwards for k bad rows (a CUDA
    out-of-memory error on a large batch ends there too: the halves fit).

    An infrastructure error (``is_infrastructure``) is raised at once, from any forward.
    """
    n = len(x)
    try:
        return forward(x), {}
    except Exception as e:  # noqa: BLE001 - a row's failure is isolated below, not fatal
        if is_infrastructure(e):
            raise
        first = short_error(e)
    if n == 1:
        return None, {0: first}
    out: np.ndarray | None = None

    def run(lo: int, hi: int) -> str | None:
        nonlocal out
        try:
            y = forward(x[lo:hi])
        except Exception as e:  # noqa: BLE001
            if is_infrastructure(e):
                raise
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
