"""Helpers that must be importable by other processes (Beam's SDK worker processes, spawned
children): put this directory on PYTHONPATH (or sys.path) there."""
from __future__ import annotations

import json
import os

import torch

from titans.models.architectures import MLP
from titans.transforms.inference import ArrowModelHandler


class PidMLP(MLP):
    """An MLP that leaves a file named after the id of every process that builds it."""

    def __init__(self, in_features: int, out_features: int, hidden, pid_dir: str):
        super().__init__(in_features, out_features, tuple(hidden))
        with open(os.path.join(pid_dir, str(os.getpid())), "w"):
            pass


def save_pid_model(directory, in_features: int, out_features: int, hidden, pid_dir,
                   seed: int = 0) -> tuple[str, str, str]:
    """(state_dict path, --ROLE-class, --ROLE-class-kwargs) of a PidMLP."""
    os.makedirs(pid_dir, exist_ok=True)
    torch.manual_seed(seed)
    path = os.path.join(directory, "pid_mlp.pt")
    torch.save(MLP(in_features, out_features, tuple(hidden)).state_dict(), path)
    kwargs = {"in_features": in_features, "out_features": out_features, "hidden": list(hidden),
              "pid_dir": str(pid_dir)}
    return path, "mp_models:PidMLP", json.dumps(kwargs)


def pids(pid_dir) -> set[int]:
    return {int(name) for name in os.listdir(pid_dir)}


class SharedOnAnyDevice(ArrowModelHandler):
    """The handler with its one-copy-per-worker loading on for the CPU too (it is for cuda)."""

    def one_copy_per_worker(self, device: str) -> bool:
        return True
