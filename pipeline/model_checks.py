"""Models checked before any work: they load, take the features' input, return logits, and
run on real sampled rows. Torch only (no Beam): the training commands use these too."""
from __future__ import annotations

import json
import logging

import numpy as np
import torch

from titans.models.forward import forward_in_chunks, isolate_failures, short_error
from titans.models.loading import ModelLoadError, ModelRef

_LOG = logging.getLogger("titans")


def load_checked(role: str, ref: ModelRef, features) -> torch.nn.Module:
    """The model of --ROLE, loaded on the CPU and tried on the input ``features`` (a spec
    from titans.transforms.features) describes; ValueError saying what to fix."""
    try:
        model = ref.load("cpu")
    except (ModelLoadError, json.JSONDecodeError) as e:
        raise ValueError(f"--{role}: {e}") from e
    try:
        out = forward_in_chunks(model, features.example_input(2), 2)
    except Exception as e:  # noqa: BLE001 - any failure here is a shape/contract problem
        raise ValueError(f"--{role} {ref.path!r} does not accept a {features.describe()}: "
                         f"{short_error(e)}") from e
    if out.dim() != 2 or out.shape[0] != 2:
        raise ValueError(f"--{role} {ref.path!r} must return logits [batch, classes]; for a "
                         f"batch of 2 it returned {tuple(out.shape)}")
    return model


def check_on_sample(role: str, model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """The model's outputs on sampled rows. A model that fails on every row is broken (a
    launch error); one that fails on a few will see those rows dead-lettered."""
    out, failed = isolate_failures(lambda xb: forward_in_chunks(model, xb, 65536).numpy(), x)
    if out is None:
        raise ValueError(f"--{role} fails on every sampled row: {next(iter(failed.values()))}")
    if failed:
        _LOG.warning("--%s failed on %d of %d sampled rows (they will be dead-lettered), e.g. %s",
                     role, len(failed), len(x), next(iter(failed.values())))
    return out[np.setdiff1d(np.arange(len(x)), list(failed))] if failed else out
