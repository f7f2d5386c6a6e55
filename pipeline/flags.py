"""Command-line pieces shared by the titans subcommands."""
from __future__ import annotations

import argparse

from titans.models.loading import ModelRef


def add_model_flags(p: argparse.ArgumentParser, role: str, required: bool = True) -> None:
    p.add_argument(f"--{role}", required=required, metavar="MODEL",
                   help=f"the {role} model: path or URL (gs://...) of a TorchScript file "
                        f"(torch.jit.save), a torch.export program (.pt2), or a state_dict "
                        f"with --{role}-class. forward: float32 [batch, features] -> logits "
                        f"[batch, classes]")
    p.add_argument(f"--{role}-class", metavar="MODULE:CLASS",
                   help=f"class to build the {role} from when MODEL is a state_dict")
    p.add_argument(f"--{role}-class-kwargs", metavar="JSON",
                   help=f"constructor arguments of --{role}-class as a JSON object, "
                        f"e.g. '{{\"in_features\": 64, \"out_features\": 10}}'")


def model_ref(args: argparse.Namespace, role: str) -> ModelRef:
    """The --ROLE, --ROLE-class, --ROLE-class-kwargs (and --ROLE-device, if any) flags."""
    return ModelRef(getattr(args, role), getattr(args, f"{role}_class"),
                    getattr(args, f"{role}_class_kwargs"),
                    getattr(args, f"{role}_device", "cpu"))


def feature_columns(spec: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ("a", "b", "c")."""
    return tuple(c.strip() for c in spec.split(",") if c.strip())
