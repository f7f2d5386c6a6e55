"""A post-hoc deferral model: P(student is wrong | its class probabilities).

Jitkrittum et al. (NeurIPS 2023) find confidence rules hard to beat, but a small model on the
student's outputs wins under label noise, specialist teachers and shift. Ours is logistic
regression (``hidden=()``) or a tiny MLP on standardised features of the probabilities:

    phi(p) = [p_(1), ..., p_(k)  (sorted, k = min(K, 5)),  p_(1) - p_(2),  H(p) / log K]
    score  = sigmoid(f(phi(p)))      f fitted by L-BFGS on  BCE(score, wrong) + l2 * ||W||^2

where "wrong" is 1[student != teacher] on a calibration set (or 1[student != label] when labels
exist). scikit-learn fits it (StandardScaler, then LogisticRegression or MLPClassifier with
solver="lbfgs"); only the fitted numbers are kept. The artifact is plain JSON (``to_bytes`` /
``from_bytes``; ``titans.transforms.io.models`` writes and reads the file), never a pickle, and scoring is plain torch on those numbers, so `titans run` needs
no scikit-learn objects and Beam can pickle the rule into a DoFn.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import torch

from titans.models.deferral_base import DeferralRule, normalised_entropy

FORMAT = "titans.learned_deferral/2"
# /1: fitted with torch's L-BFGS, standardised with the sample std (key "std"); scored the same
READABLE_FORMATS = ("titans.learned_deferral/1", FORMAT)
MAX_TOP_K = 5


def deferral_features(probs: torch.Tensor) -> torch.Tensor:
    """phi(p) [B, k+2]: sorted top-k probabilities, top1 - top2 margin, normalised entropy."""
    if probs.dim() != 2 or probs.shape[1] < 2:
        raise ValueError(f"need class probabilities [B, K] with K >= 2, got {tuple(probs.shape)}")
    probs = probs.float()
    top = probs.topk(min(probs.shape[1], MAX_TOP_K), dim=-1).values
    margin = top[:, 0] - top[:, 1]
    return torch.cat([top, margin[:, None], normalised_entropy(probs)[:, None]], dim=1)


def feature_names(num_classes: int) -> list[str]:
    return [f"p_top{i + 1}" for i in range(min(num_classes, MAX_TOP_K))] + ["margin", "norm_entropy"]


class LearnedDeferral(DeferralRule):
    """score(probs) = predicted probability that the student is wrong (higher = defer)."""
    name = "learned"

    def __init__(self, hidden: tuple[int, ...] = (), l2: float = 1e-3, max_iter: int = 200):
        self.hidden = tuple(int(h) for h in hidden)
        self.l2 = float(l2)
        self.max_iter = int(max_iter)
        self.num_classes: int | None = None
        self.mean = self.scale = None
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight [out, in], bias [out])
        self.train_info: dict = {}

    # ------------------------------------------------------------------ fitting
    def fit(self, student_probs, target_wrong, seed: int = 0) -> "LearnedDeferral":
        """Fit on a calibration set: student probabilities [N, K] and 1[student wrong] [N]."""
        from sklearn.exceptions import ConvergenceWarning  # only when fitting: calibrate, not run
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
        from sklearn.preprocessing import StandardScaler

        probs = torch.as_tensor(np.asarray(student_probs, dtype=np.float32))
        y = np.asarray(target_wrong)
        if y.shape != (probs.shape[0],):
            raise ValueError(f"target_wrong must have shape ({probs.shape[0]},), got {y.shape}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("target_wrong must be 0/1 (or bool): 1 where the student is wrong")
        y = y.astype(np.int64)
        n, n_wrong = len(y), int(y.sum())
        if n_wrong in (0, n):
            raise ValueError(f"cannot learn when the student is wrong on {n_wrong} of {n} rows: "
                             f"use a larger or more varied calibration set, or a confidence rule")
        feats = deferral_features(probs).double().numpy()
        scaler = StandardScaler().fit(feats)  # a constant feature keeps scale 1
        z = scaler.transform(feats)
        # sklearn's penalties, rewritten as mean BCE + l2 * ||W||^2 (biases not penalised):
        # LogisticRegression: C sum(BCE) + ||w||^2 / 2;  MLPClassifier: mean(BCE) + alpha ||W||^2 / 2n
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is the budget we chose
            if self.hidden:
                clf = MLPClassifier(self.hidden, solver="lbfgs", alpha=2.0 * n * self.l2,
                                    max_iter=self.max_iter, random_state=seed).fit(z, y)
                fitted = [(w.T, b) for w, b in zip(clf.coefs_, clf.intercepts_)]
            else:
                c = 1.0 / (2.0 * n * self.l2) if self.l2 > 0 else np.inf
                clf = LogisticRegression(C=c, max_iter=self.max_iter).fit(z, y)
                fitted = [(clf.coef_, clf.intercept_)]
        self.num_classes = probs.shape[1]
        self.mean = torch.tensor(scaler.mean_, dtype=torch.float32)
        self.scale = torch.tensor(scaler.scale_, dtype=torch.float32)
        self.layers = [(torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
                       for w, b in fitted]
        self.train_info = {"rows": n, "wrong_rate": n_wrong / n, "seed": int(seed),
                           "iterations": int(np.max(clf.n_iter_))}
        return self

    # ------------------------------------------------------------------ scoring
    def score(self, probs: torch.Tensor) -> torch.Tensor:
        if not self.layers:
            raise RuntimeError("LearnedDeferral is not fitted: call fit(...) or LearnedDeferral.from_bytes(data)")
        if probs.shape[-1] != self.num_classes:
            raise ValueError(f"learned deferral model was fitted for {self.num_classes} classes, "
                             f"got probabilities with {probs.shape[-1]}")
        z = (deferral_features(probs) - self.mean) / self.scale
        with torch.no_grad():
            return torch.sigmoid(_forward(z, self.layers))

    def describe(self) -> dict:
        return {"rule": self.name, "model": "logistic" if not self.hidden else f"mlp{list(self.hidden)}",
                "features": feature_names(self.num_classes) if self.num_classes else None,
                "num_classes": self.num_classes, "l2": self.l2, **self.train_info}

    # ------------------------------------------------------------------ artifact
    def to_dict(self) -> dict:
        if not self.layers:
            raise RuntimeError("nothing to save: the model is not fitted")
        return {"format": FORMAT, "hidden": list(self.hidden), "l2": self.l2, "max_iter": self.max_iter,
                "num_classes": self.num_classes, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "layers": [{"weight": w.tolist(), "bias": b.tolist()} for w, b in self.layers],
                "train": self.train_info}

    def to_bytes(self) -> bytes:
        """The fitted model as JSON (float32 weights survive the round trip exactly)."""
        return json.dumps(self.to_dict(), indent=1).encode("utf-8")

    @classmethod
    def from_dict(cls, d: dict, where: str = "learned deferral model") -> "LearnedDeferral":
        if not isinstance(d, dict) or d.get("format") not in READABLE_FORMATS:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{where}: not a learned deferral model (format {got!r}, expected "
                             f"one of {READABLE_FORMATS})")
        try:
            model = cls(hidden=tuple(d["hidden"]), l2=d["l2"], max_iter=d["max_iter"])
            model.num_classes = int(d["num_classes"])
            model.mean = torch.tensor(d["mean"], dtype=torch.float32)
            scale = d["scale"] if d["format"] == FORMAT else d["std"]
            model.scale = torch.tensor(scale, dtype=torch.float32)
            model.layers = [(torch.tensor(layer["weight"], dtype=torch.float32),
                             torch.tensor(layer["bias"], dtype=torch.float32)) for layer in d["layers"]]
            model.train_info = dict(d.get("train", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed learned deferral model: {type(e).__name__}: {e}") from e
        n_features = len(feature_names(model.num_classes))
        if model.mean.shape != (n_features,) or not model.layers or model.layers[0][0].shape[1] != n_features:
            raise ValueError(f"{where}: layer shapes do not match {n_features} features for "
                             f"{model.num_classes} classes")
        return model

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "learned deferral model") -> "LearnedDeferral":
        """The model ``to_bytes`` wrote; ``where`` (its path) names it in messages."""
        try:
            d = json.loads(data)
        except ValueError as e:  # JSON (or UTF-8) failure becomes one message
            raise ValueError(f"cannot read learned deferral model {where!r}: {e}") from e
        return cls.from_dict(d, where=where)


def _forward(z: torch.Tensor, layers) -> torch.Tensor:
    """Linear layers with ReLU between them; returns the logit [B]."""
    for i, (w, b) in enumerate(layers):
        z = z @ w.T + b
        if i < len(layers) - 1:
            z = torch.relu(z)
    return z.squeeze(-1)
