"""A model over a whole feature matrix, a bounded number of rows per forward pass."""
from __future__ import annotations

import warnings

import numpy as np
import torch


def forward_in_chunks(module, x: np.ndarray, chunk: int, device: str = "cpu") -> torch.Tensor:
    """Logits (float32, on the CPU) of ``module`` on every row of ``x``, ``chunk`` rows per
    forward, without autograd. Chunks go to ``device`` and the logits come back.

    An empty ``x`` gives an empty [0, 0] tensor (the width is unknown without a forward).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    x = np.asarray(x, dtype=np.float32)
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
