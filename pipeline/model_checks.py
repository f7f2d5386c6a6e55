"""Models checked before any work: they load, take the features' input, return logits, and
run on real sampled rows. Torch only (no Beam): the training commands use these too.

Those checks run the models, the teacher included (the costly one): a ``Tally`` passed to
them counts every row they run a model on, so that a report can say how many rows the
teacher saw at launch besides the ones it labeled.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import torch

from titans.models.forward import forward_in_chunks, isolate_failures, short_error
from titans.models.loading import ModelLoadError, ModelRef
from titans.transforms.io.models import load_model_file

_LOG = logging.getLogger("titans")


@dataclasses.dataclass
class Tally:
    """Rows a model was run on by launch-time checks (every forward's rows, failed ones too)."""
    rows: int = 0

    def add(self, n: int) -> None:
        self.rows += int(n)


def load_checked(role: str, ref: ModelRef, features, tally: Tally | None = None) -> torch.nn.Module:
    """The model of --ROLE, loaded on the CPU and tried on the input ``features`` (a spec
    from titans.transforms.features) describes; ValueError saying what to fix. ``tally``
    counts the rows of that try."""
    try:
        model = load_model_file(ref, "cpu")
    except (ModelLoadError, json.JSONDecodeError) as e:
        raise ValueError(f"--{role}: {e}") from e
    try:
        example = features.example_input(2)
        if tally is not None:
            tally.add(len(example))
        out = forward_in_chunks(model, example, 2)
    except Exception as e:  # noqa: BLE001 - any failure here is a shape/contract problem
        raise ValueError(f"--{role} {ref.path!r} does not accept a {features.describe()}: "
                         f"{short_error(e)}") from e
    if out.dim() != 2 or out.shape[0] != 2:
        raise ValueError(f"--{role} {ref.path!r} must return logits [batch, classes]; for a "
                         f"batch of 2 it returned {tuple(out.shape)}")
    return model


def check_on_sample(role: str, model: torch.nn.Module, x: np.ndarray,
                    tally: Tally | None = None) -> np.ndarray:
    """The model's outputs on sampled rows. A model that fails on every row is broken (a
    launch error); one that fails on a few will see those rows dead-lettered. ``tally``
    counts every row run, the retries that find failing rows included."""
    def forward(xb: np.ndarray) -> np.ndarray:
        if tally is not None:
            tally.add(len(xb))
        return forward_in_chunks(model, xb, 65536).numpy()

    out, failed = isolate_failures(forward, x)
    if out is None:
        raise ValueError(f"--{role} fails on every sampled row: {next(iter(failed.values()))}")
    if failed:
        _LOG.warning("--%s failed on %d of %d sampled rows (they will be dead-lettered), e.g. %s",
                     role, len(failed), len(x), next(iter(failed.values())))
    return out[np.setdiff1d(np.arange(len(x)), list(failed))] if failed else out
