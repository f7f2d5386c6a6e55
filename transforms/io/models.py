"""The files of ``titans.models``: model files, CAL.json, learned deferral models and plots.

``titans.models`` turns these into and from bytes and reads or writes no file; here they are
read and written through ``storage`` (local paths or any URL it knows). A file that cannot be
read is one line naming it: a ModelLoadError for a model, a CalibrationError for a CAL.json,
a ValueError for a learned deferral model.
"""
from __future__ import annotations

import torch

from titans.models.calibration import (CalibrationError, calibration_from_bytes,
                                       calibration_to_bytes, plot_curves)
from titans.models.learned_deferral import LearnedDeferral
from titans.models.loading import (ModelLoadError, ModelRef, load_model, resolve_device,
                                   torchscript_bytes)
from titans.transforms.io.storage import read_bytes, write_bytes


def load_model_file(model: str | ModelRef, device: str | None = None) -> torch.nn.Module:
    """The one way to load a model from a path: read ``model`` (a path, or a ModelRef with
    its class, constructor arguments and trust) and build it on ``device`` (default: the
    ref's device, resolved; "cpu" for a bare path). Raises ModelLoadError with the reason."""
    ref = model if isinstance(model, ModelRef) else ModelRef(model)
    if device is None:
        device = resolve_device(ref.device)
    try:
        data = read_bytes(ref.path)
    except Exception as e:  # noqa: BLE001 - any IO failure becomes one clear message
        raise ModelLoadError(f"cannot read model file {ref.path!r}: {e}") from e
    return load_model(data, ref.model_class, ref.kwargs(), device=device,
                      trust_code=ref.trust_code, name=ref.path)


def save_torchscript(model: torch.nn.Module, path: str, metadata: dict | None = None) -> None:
    """Save a module as TorchScript (what the pipeline reads), with optional JSON metadata."""
    write_bytes(path, torchscript_bytes(model, metadata))


def save_calibration(path: str, data: dict) -> None:
    """Validate ``data`` and write it as CAL.json (infinities as "-inf"/"inf")."""
    write_bytes(path, calibration_to_bytes(data, where=path))


def load_calibration(path: str) -> dict:
    """Read and validate a CAL.json; the threshold comes back as a float (possibly -inf)."""
    try:
        raw = read_bytes(path)
    except Exception as e:  # noqa: BLE001 - any IO failure becomes one clear message
        raise CalibrationError(f"cannot read calibration file {path!r}: {e}") from e
    return calibration_from_bytes(raw, where=path)


def save_learned_deferral(model: LearnedDeferral, path: str) -> None:
    """Write a fitted learned deferral model as JSON."""
    write_bytes(path, model.to_bytes())


def load_learned_deferral(path: str) -> LearnedDeferral:
    """Read a learned deferral model (what ``make_rule("learned", ...)`` takes)."""
    try:
        raw = read_bytes(path)
    except Exception as e:  # noqa: BLE001 - IO failure becomes one message
        raise ValueError(f"cannot read learned deferral model {path!r}: {e}") from e
    return LearnedDeferral.from_bytes(raw, where=path)


def save_plot(path: str, curves: dict, **kw) -> None:
    """``plot_curves(curves, **kw)`` written to ``path``, in the format its extension names
    (PNG when it has none)."""
    name = path.rsplit("/", 1)[-1]
    fmt = name.rsplit(".", 1)[-1].lower() if "." in name else "png"
    write_bytes(path, plot_curves(curves, fmt, **kw))
