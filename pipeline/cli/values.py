"""What the flags' values become: argparse types and the few objects built from flags.

Light on purpose, like the flags themselves: argparse only (a ModelRef imports torch, so it is
built only once a command runs).
"""
from __future__ import annotations

import argparse


def model_ref(args: argparse.Namespace, role: str):
    """The --ROLE, --ROLE-class, --ROLE-class-kwargs (and --ROLE-device, if any) flags, with
    --trust-model-code, as a ``titans.models.loading.ModelRef``."""
    from titans.models.loading import ModelRef  # imports torch: only once a command runs

    return ModelRef(getattr(args, role), getattr(args, f"{role}_class"),
                    getattr(args, f"{role}_class_kwargs"),
                    getattr(args, f"{role}_device", "cpu"),
                    trust_code=getattr(args, "trust_model_code", False))


def feature_columns(spec: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ("a", "b", "c")."""
    return tuple(c.strip() for c in spec.split(",") if c.strip())


def share(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def byte_size(text: str) -> int:
    """argparse type: a positive number of bytes, or of KiB, MiB or GiB ('64MiB')."""
    number = text.strip()
    scale = 1
    for suffix, shift in (("KiB", 10), ("MiB", 20), ("GiB", 30), ("K", 10), ("M", 20), ("G", 30)):
        if number.endswith(suffix):
            number, scale = number[:-len(suffix)].strip(), 1 << shift
            break
    try:
        value = int(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bytes (or KiB, MiB, GiB), got "
                                         f"{text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text}")
    return value


def dims(text: str) -> tuple[int, int]:
    """argparse type: 'H,W' -> (H, W)."""
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (two integers), got {text!r}")
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text}")
    return h, w


def floats(text: str) -> tuple[float, ...]:
    """argparse type: '0.5' or '0.485,0.456,0.406' -> a tuple of floats."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
