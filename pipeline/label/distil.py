"""Phase 3, distil: the labeled sample is split (seeded) into training, validation and
calibration rows; students within the budget are distilled together with kd on the training
rows (inputs standardised inside the student, early stopping, a time budget) and the
cheapest cascade on the validation rows wins (``titans.models.student_search``; on token
ids, int64 [N, L] padded to the sample's longest row, token students whose vocabulary is the
teacher's embedding table or the sample's largest id plus a margin)
-> DIR/student.pt (TorchScript, with its provenance as metadata)."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from titans.models.deferral import CONFIDENCE_RULES
from titans.models.student_search import Target, ltt_bar, sample_vocab, search_student
from titans.pipeline.label.job_dir import CAL_SHARE, VAL_SHARE
from titans.transforms.io import storage
from titans.transforms.io.models import save_torchscript

_LOG = logging.getLogger("titans")


@dataclasses.dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    cal: np.ndarray


def split_sample(n: int, seed: int) -> Split:
    """Seeded split of the labeled sample: CAL_SHARE calibration rows, VAL_SHARE validation
    rows (architecture and rule), the rest training rows."""
    perm = np.random.default_rng([seed, 2]).permutation(n)
    n_cal, n_val = int(round(CAL_SHARE * n)), int(round(VAL_SHARE * n))
    return Split(np.sort(perm[n_cal + n_val:]), np.sort(perm[n_cal:n_cal + n_val]),
                 np.sort(perm[:n_cal]))


def run(c, launch, s, split: Split, jd) -> dict:
    """Search, distil and save the student; the facts phases.json and report.json keep."""
    target = (Target(deferral_rate=c.deferral_rate) if c.eps is None else
              Target(bar=ltt_bar(len(split.cal), c.eps, c.level)))
    if target.bar is not None and target.bar < 0:
        _LOG.warning("%d calibration rows are too few to certify anything at EPS %g, delta %g: "
                     "every row outside the sample will go to the teacher; raise --sample-rows",
                     len(split.cal), c.eps, c.level)

    def report(cand):
        print(f"    student {cand.arch:>9}: {cand.flops_share:7.2%} of the teacher's FLOPs, "
              f"validation agreement {cand.val_agreement:.2%}, "
              + (f"deferral needed {cand.deferral:.1%}" if c.eps is not None else
                 f"disagreement at the rate {cand.disagreement:.2%}")
              + f" (rule {cand.rule}), best of {cand.epochs} epochs: {cand.best_epoch} "
              f"({cand.stopped})", flush=True)

    x = s.x.reshape(len(s.x), -1)  # images [N, C, H, W] as vectors: the MLP students' input
    vocab = pad_id = None
    if launch.tokens:  # int64 token ids [N, L]: token students, never cast to float
        pad_id = launch.features.pad_id
        vocab = launch.teacher_vocab or sample_vocab(s.x, pad_id)
    epochs_log = logging.getLogger("titans.models.distill")  # a line per epoch: too many here
    level = epochs_log.level
    epochs_log.setLevel(logging.WARNING)
    try:
        result = search_student(
            x[split.train], s.probs[split.train], x[split.val], s.teacher_pred[split.val],
            teacher_flops=launch.teacher_flops, budget=c.student_budget, target=target,
            rules=(c.rule,) if c.rule else CONFIDENCE_RULES, seed=c.job.seed,
            audit_rate=c.audit_rate, proxy=launch.proxy, report=report, vocab=vocab,
            pad_id=pad_id or 0)
    finally:
        epochs_log.setLevel(level)
    best = result.best
    limit = ("no time budget" if result.time_budget is None else
             f"time budget {result.time_budget:.0f} s"
             + (", reached: training cut short" if result.budget_hit else ""))
    print(f"    search: {len(result.candidates)} candidates trained together in "
          f"{result.seconds:.1f} s ({limit})", flush=True)
    facts = {"arch": best.arch, "rule": best.rule, "flops_per_row": best.flops,
             "flops_share": best.flops_share, "parameters": best.parameters,
             "val_agreement": best.val_agreement, "val_deferral": best.deferral,
             "teacher_flops_per_row": launch.teacher_flops,
             "teacher_parameters": launch.teacher_parameters, "compute_proxy": launch.proxy,
             "token_vocab": vocab,
             "budget_flops_per_row": result.budget_flops, "ltt_bar": target.bar,
             "split_rows": {"train": len(split.train), "validation": len(split.val),
                            "calibration": len(split.cal)},
             "training": {"method": "kd", "standardised": vocab is None, **result.training},
             "search_seconds": round(result.seconds, 3),
             "search_time_budget_seconds": result.time_budget,
             "search_time_budget_hit": result.budget_hit, "candidates": result.table()}
    save_torchscript(result.student, jd.student, {
        "method": "kd", "arch": best.arch, "feature_columns": list(launch.features.columns),
        "feature_dim": launch.features.dim, "num_classes": launch.num_classes,
        "outputs": launch.num_classes, "seed": c.job.seed,
        "teacher": storage.absolute(c.job.teacher.path),
        "train_rows": len(split.train), "val_rows": len(split.val), "rule": best.rule,
        "titans_label": {k: v for k, v in facts.items() if k != "candidates"}})
    return facts


__all__ = ["Split", "split_sample", "run"]
