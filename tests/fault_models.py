"""Python model classes (``--teacher-class module:Class``, a state_dict of ``MLP``) that fail
the way machines fail, for the fault tests: put this directory on PYTHONPATH (or sys.path)
where they are loaded. TorchScript cannot raise these exceptions; a Python class can."""
from __future__ import annotations

import json
import os

import torch

from titans.models.architectures import MLP

_BUILT: dict[str, int] = {}  # instances built in this process, per failure kind and tag


class OOMAbove(MLP):
    """Raises CUDA's out-of-memory error on a forward of more than ``max_rows`` rows, as a GPU
    does on a batch that does not fit; smaller forwards work."""

    def __init__(self, in_features: int, out_features: int, hidden, max_rows: int):
        super().__init__(in_features, out_features, tuple(hidden))
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} rows "
                                         f"(at most {self.max_rows} fit)")
        return super().forward(x)


class FailsAfterLaunch(MLP):
    """Works in the launch checks (the first instance built in a process), then raises on every
    call from the instances the job's workers build: ``error`` "connection" (a lost model
    server: ConnectionError), "cuda" (a CUDA error) or "broken" (a model error on every row)."""

    def __init__(self, in_features: int, out_features: int, hidden, error: str, tag: str = ""):
        super().__init__(in_features, out_features, tuple(hidden))
        self.error = error
        key = f"{error}|{tag}"  # tag: one count per test in a pytest process
        _BUILT[key] = _BUILT.get(key, 0) + 1
        self.live = _BUILT[key] > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.live:
            if self.error == "connection":
                raise ConnectionError("lost the connection to the model server")
            if self.error == "cuda":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            raise RuntimeError("this model cannot score anything")
        return super().forward(x)


def save_class_model(directory, cls: str, in_features: int, out_features: int, hidden,
                     seed: int = 0, **kwargs) -> list[str]:
    """The flags of a ``fault_models`` model: --teacher PATH --teacher-class ... --teacher-class-kwargs ..."""
    torch.manual_seed(seed)
    path = os.path.join(str(directory), f"{cls.lower()}.pt")
    torch.save(MLP(in_features, out_features, tuple(hidden)).state_dict(), path)
    kw = {"in_features": in_features, "out_features": out_features, "hidden": list(hidden), **kwargs}
    return ["--teacher", path, "--teacher-class", f"fault_models:{cls}",
            "--teacher-class-kwargs", json.dumps(kw)]


def host_shared_model(handler, ready, stop) -> None:
    """In a child process: load ``handler``'s model as the worker's one shared copy (this
    process then serves it, as the first SDK process on a Dataflow worker does), say so, and
    serve until told to stop (or killed)."""
    handler.load_model()
    ready.set()
    stop.wait(300)
