"""Turn a model's bytes into a runnable module, and a module into TorchScript bytes.

No file is read or written here: ``titans.transforms.io.models`` reads a model file
(``load_model_file``) and writes one (``save_torchscript``). A model's bytes are:
  * a TorchScript file (``torch.jit.save``),
  * a ``torch.export`` program (``.pt2``, ``torch.export.save``),
  * a state_dict, together with ``model_class="package.module:Class"``.
Its forward takes float32 ``[batch, features]`` and returns logits ``[batch, outputs]``.

Model files run no code unless the user opts in (``trust_code``, ``--trust-model-code``)
------------------------------------------------------------------------------------
Formats are told by content, never by the file's name. Without ``trust_code`` every file is
vetted before torch reads it, and TorchScript and torch.export models again once loaded,
before anything is called: ``titans.models.model_safety`` says what is refused and why (zips
that declare more than a model unpacks to, pickles that need more than tensors, TorchScript
``__setstate__`` and hooks, and any operator outside a documented allowlist of plain tensor
and control-flow operators). A refusal is a ModelLoadError that names the flag.

With ``trust_code`` no check runs, and ``torch.load(weights_only=False)`` reads a pickled
``nn.Module`` (``torch.save(model)``, its class importable) or a state_dict checkpoint holding
other objects: the user has said the file is as trusted as their own code.
"""
from __future__ import annotations

import dataclasses
import importlib
import io
import json
import re

import torch

from titans.models import model_safety
from titans.models.model_safety import Unsafe


class ModelLoadError(ValueError):
    """A model file could not be turned into a runnable module; the message says why."""


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """Where a model lives, how to build it, and where it should run ('cpu', 'cuda' or 'auto').

    A plain description: ``titans.transforms.io.models.load_model_file(ref)`` loads it.
    ``trust_code``: the user allows model files that can run code when loaded (pickled
    members of a torch.export archive); off by default.
    """
    path: str
    model_class: str | None = None
    model_kwargs: str | None = None  # JSON object of the class's constructor arguments
    device: str = "cpu"
    trust_code: bool = False

    def kwargs(self) -> dict | None:
        """The constructor arguments, parsed from ``model_kwargs``."""
        return json.loads(self.model_kwargs) if self.model_kwargs else None


def import_class(spec: str):
    """``"package.module:Class"`` -> the class object."""
    if ":" not in spec:
        raise ModelLoadError(f"model class {spec!r} must look like 'package.module:Class'")
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"cannot import model class {spec!r}: {e}") from e
    return obj


def load_model(data: bytes, model_class: str | None = None, model_kwargs: dict | None = None,
               device: str = "cpu", trust_code: bool = False, *,
               name: str = "<bytes>") -> torch.nn.Module:
    """A model file's bytes -> a module for inference (eval mode, on ``device``).

    ``name`` (the file's path) is what the messages call the model. Raises ModelLoadError with
    the reason. Without ``trust_code`` a file that could run code when loaded or called is
    refused (see the module docstring)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_model takes the model file's bytes, not {type(data).__name__}: "
                        "titans.transforms.io.models.load_model_file reads a path")
    data = bytes(data)
    buf = io.BytesIO(data)
    try:
        if not trust_code:
            model_safety.check_zip(data)  # before anything (torch or a scan) unpacks a member
        if model_class:
            model = _load_state_dict(buf, model_class, model_kwargs, device, trust_code)
        elif _is_export_archive(data):
            if not trust_code:
                model_safety.check_export_archive(data)
            program = torch.export.load(buf)
            if not trust_code:
                model_safety.check_ops(program)
            model = program.module()
        elif _is_torchscript(data):
            if not trust_code:
                model_safety.check_torchscript_archive(data)
            model = torch.jit.load(buf, map_location=device)
            if not trust_code:
                model_safety.check_ops(model)
        elif trust_code:
            model = torch.load(buf, map_location=device, weights_only=False)
            if not isinstance(model, torch.nn.Module):
                raise ModelLoadError(f"cannot load model {name!r}: it holds a "
                                     f"{type(model).__name__}, not a module. If it is a "
                                     "state_dict, also pass its class as module:Class.")
        elif data[:1] == b"\x80" or model_safety.mentions(data, b"data.pkl"):  # a pickle
            raise Unsafe("it is a pickle, not TorchScript or torch.export. If it is a state_dict, "
                         "also pass its class as module:Class. A pickled model "
                         "(torch.save(model)) loads only by full unpickling")
        else:
            raise ModelLoadError(f"cannot load model {name!r}: not a TorchScript, torch.export "
                                 "or torch.save file. If it is a state_dict, also pass its class "
                                 "as module:Class.")
    except Unsafe as e:
        raise ModelLoadError(f"cannot load model {name!r}: {e}. {e.advice}") from None
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001
        hint = ("" if model_class else
                " If it is a state_dict, also pass its class as module:Class.")
        raise ModelLoadError(f"cannot load model {name!r}: {type(e).__name__}: {e}.{hint}") from e
    model = model.to(device)
    if hasattr(model, "eval"):
        try:
            model.eval()
        except NotImplementedError:  # exported programs refuse .eval(); they are frozen anyway
            pass
    return model


def _load_state_dict(buf, model_class, model_kwargs, device, trust_code) -> torch.nn.Module:
    cls = import_class(model_class)
    try:
        state = torch.load(buf, map_location=device, weights_only=not trust_code)
    except Exception as e:  # noqa: BLE001
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if trust_code or not refused:
            raise
        raise Unsafe(f"its pickle builds {refused.group(1)}, not just tensors") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = cls(**(model_kwargs or {}))
    model.load_state_dict(state)
    return model


def _zip_names(data: bytes) -> list[str]:
    return [info.filename for info in model_safety.zip_infos(data) or []]


def _is_export_archive(data: bytes) -> bool:
    """torch.export archives are zips holding a serialized ExportedProgram, unlike TorchScript."""
    return any(n.split("/")[-1] == "archive_format" for n in _zip_names(data))


def _is_torchscript(data: bytes) -> bool:
    return any(n.split("/")[-1] == "constants.pkl" for n in _zip_names(data))


def torchscript_bytes(model: torch.nn.Module, metadata: dict | None = None) -> bytes:
    """A module as a TorchScript file's bytes (what the pipeline reads), with optional JSON
    metadata (``titans.json``)."""
    model = model.eval()
    scripted = torch.jit.script(model)
    extra = {"titans.json": json.dumps(metadata or {})}
    buf = io.BytesIO()
    torch.jit.save(scripted, buf, _extra_files=extra)
    return buf.getvalue()


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a usable GPU is present, else 'cpu'; 'gpu' is an alias of 'cuda'."""
    device = device.lower()
    if device == "gpu":
        device = "cuda"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but torch sees no usable CUDA GPU "
                             f"(torch {torch.__version__}, cuda build: {torch.version.cuda})")
    return device


def count_parameters(model) -> int:
    """Number of parameters: our proxy for compute per row (an MLP costs ~2 FLOPs per weight)."""
    try:
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - an exported module without parameters()
        return 0
