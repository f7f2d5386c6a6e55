"""Built-in architectures: the MLP students and teachers the demo and benchmarks train, the
bag-of-embeddings student `titans label` distils for token-id inputs, and ``Standardize``, the
input scaling `titans label` bakes into its vector students (``StandardizedMLP``)."""
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


class TokenMLP(nn.Module):
    """int64 token ids [B, L] -> logits: ``Embedding(vocab + 1, embed_dim)``, the mean over
    the positions that are not ``pad_id``, then the ``MLP`` head the vector students use.

    ``vocab`` is fixed when the student is built; an id outside ``[0, vocab)`` (one the sample
    never showed, or a negative one) is looked up in one out-of-vocabulary row, ``vocab``,
    which starts at zero, so no row can index out of range. A row of only padding gets the
    zero vector. TorchScript-scriptable, and made only of ops on the model-safety allowlist.
    """

    def __init__(self, vocab: int, out_features: int, embed_dim: int = 16,
                 hidden: tuple[int, ...] = (), pad_id: int = 0):
        super().__init__()
        if vocab < 1 or embed_dim < 1:
            raise ValueError(f"need vocab >= 1 and embed_dim >= 1, got {vocab}, {embed_dim}")
        self.vocab = int(vocab)
        self.pad_id = int(pad_id)
        self.embed = nn.Embedding(self.vocab + 1, embed_dim)
        with torch.no_grad():
            self.embed.weight[self.vocab].zero_()  # the out-of-vocabulary bucket
        self.head = MLP(embed_dim, out_features, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x != self.pad_id).unsqueeze(-1).to(torch.float32)      # [B, L, 1]
        ids = x.masked_fill((x < 0) | (x >= self.vocab), self.vocab)    # out of range -> OOV
        summed = (self.embed(ids) * mask).sum(dim=1)                    # [B, D]
        return self.head(summed / mask.sum(dim=1).clamp_min(1.0))


class Standardize(nn.Module):
    """``(x.flatten(1) - mean) / std`` per feature, with mean and std stored as buffers, so a
    saved student needs nothing else to read raw rows. A feature with std 0 (or not finite)
    is only shifted. Made of ops on the model-safety allowlist (sub, mul)."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.shape != std.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)} differ in shape")
        ok = torch.isfinite(std) & (std > 0)
        self.register_buffer("mean", torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean)))
        # a multiply, not a divide, in the hot path; the inverse computed once here
        self.register_buffer("inv_std", torch.where(ok, 1.0 / torch.where(ok, std, 1.0), 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - self.mean) * self.inv_std


class StandardizedMLP(nn.Module):
    """``Standardize`` then an ``MLP``: the vector student of `titans label`. Its attributes
    ``scale`` and ``mlp`` are the two parts (``mlp`` is trained; ``scale`` is fixed)."""

    def __init__(self, in_features: int, out_features: int, hidden: tuple[int, ...],
                 mean, std):
        super().__init__()
        self.scale = Standardize(mean, std)
        if self.scale.mean.numel() != in_features:
            raise ValueError(f"mean and std have {self.scale.mean.numel()} features, "
                             f"the student takes {in_features}")
        self.mlp = MLP(in_features, out_features, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.scale(x))


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
