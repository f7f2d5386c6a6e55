"""Built-in architectures: the MLP students and teachers the demo and benchmarks train."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """``in_features -> hidden... -> out_features`` with ReLU; ``hidden=()`` is logistic regression."""

    def __init__(self, in_features: int, out_features: int, hidden: tuple[int, ...] = (64,),
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # images [B, C, H, W] as vectors of C*H*W


def parse_hidden(spec: str) -> tuple[int, ...]:
    """``"256,256"`` -> (256, 256); ``""`` or ``"linear"`` -> () (no hidden layer)."""
    spec = spec.strip()
    if spec in ("", "linear"):
        return ()
    try:
        sizes = tuple(int(s) for s in spec.split(","))
    except ValueError as e:
        raise ValueError(f"architecture {spec!r} must be comma-separated layer widths, e.g. 64,64") from e
    if any(s <= 0 for s in sizes):
        raise ValueError(f"architecture {spec!r}: layer widths must be positive")
    return sizes
