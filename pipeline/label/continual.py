"""`titans label --state DIR`: the phases of a run whose student keeps learning from the
teacher across scheduled runs (the store itself, its generations, lock, pool cap and
history files, is ``pipeline/state/``; the training arithmetic is ``models/continual.py``).

A run with --state:
  * ``begin``: reads the state's current generation (none, or --state-reset: a cold start,
    i.e. today's plain `titans label`), refuses a state written for another teacher or
    feature schema, and for a warm run sizes the fresh sample for today: the size that
    minimises the run's expected teacher rows, predicted from yesterday's student on the
    previous run's held-out rows (``models.fresh_sample``) when today's rows read at launch
    look like them; the generation it starts from goes into every phase key, so --resume
    reuses phases only while the state is still that generation;
  * ``split``: today's fresh rows into fine-tune / validation / calibration parts;
  * ``warm_distil`` (phase 3 of a warm run): yesterday's student measured on today's fresh
    rows (drift), copied and fine-tuned on the pool plus today's fine-tune part, and kept
    or replaced on today's validation rows (champion / challenger). Calibration (phase 4)
    is the plain one, on today's calibration rows only: never pool or hard rows;
  * then this run's line of the history and, after _SUCCESS, the commit of a new generation
    (``pipeline/label/state_commit.py``).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from titans.models import continual as mc
from titans.models import fresh_sample
from titans.models.deferral import CONFIDENCE_RULES
from titans.pipeline.label.distil import Split
from titans.transforms.features import ImageSpec, feature_matrix
from titans.transforms.io import storage

_LOG = logging.getLogger("titans")

PROBS, FRESH_SPLIT = "teacher_probs", "fresh_split"  # the pool's own columns besides the store's
HISTORY_PNG = "history.png"


def model_columns(features) -> list[str]:
    """The input columns the models read (what the pool keeps of a row)."""
    return [features.column] if hasattr(features, "column") else list(features.columns)


def feature_schema(plan) -> dict:
    """What the state's student was trained on: the model columns, their Arrow types, the
    resolved input and the classes (compared for equality with the state's)."""
    cols = model_columns(plan.features)
    schema = plan.source.schema
    return {"columns": cols, "types": [str(schema.field(c).type) for c in cols],
            "input": plan.features.describe(), "num_classes": int(plan.num_classes)}


@dataclasses.dataclass
class Continual:
    """One run's view of its --state: the store, the generation it started from, the mode."""
    store: object                  # pipeline.state.store.StateDir
    base: object | None            # the State it starts from (None: a cold start)
    teacher: dict                  # {"path", "sha256"}
    schema: dict
    pool_rows: int
    sizes: dict | None = None      # warm: the fresh sample's parts
    # warm: (KS, p, shifted) of yesterday's student's scores on the rows read at launch
    launch_shift: tuple | None = None
    _pool: pa.Table | None = dataclasses.field(default=None, repr=False)
    _heldout: tuple | None = dataclasses.field(default=None, repr=False)
    _student: object = dataclasses.field(default=None, repr=False)
    heldout_agreement: float | None = None
    job_start: float | None = None  # the command's start: the fine-tune's deadline counts from it

    def __getstate__(self) -> dict:
        # the cascade's last step carries this object (the history entry): not the pool
        return {**self.__dict__, "_pool": None, "_heldout": None, "_student": None}

    @property
    def warm(self) -> bool:
        return self.base is not None and self.base.student_path is not None

    @property
    def key(self) -> dict:
        """What the phases depend on: the generation started from (and its student)."""
        if self.base is None:
            return {"generation": None, "pool_rows": self.pool_rows}
        return {"generation": self.base.generation, "pool_rows": self.pool_rows,
                "student_sha256": self.base.meta.get("student", {}).get("sha256")}

    @property
    def history(self) -> list[dict]:
        return list(self.base.history) if self.base is not None else []

    def split(self, n: int, seed: int) -> Split:
        parts = fresh_sample.split_fresh(n, self.sizes, seed)
        return Split(parts["train"], parts["val"], parts["cal"])

    def pool(self) -> pa.Table | None:
        """The pool of the generation started from (read once; None: none kept)."""
        if self.base is None or self.pool_rows <= 0:
            return None
        if self._pool is None:
            self._pool = self.base.read_pool()
        return self._pool

    def student(self):
        """Yesterday's student, the one started from (loaded once; a warm run only)."""
        if self._student is None:
            self._student = _load(self.base.student_path)
        return self._student

    @property
    def rule(self) -> str:
        """The deferral rule of the student started from."""
        config = self.base.meta.get("student", {}).get("config", {}) if self.base else {}
        return config.get("rule") or CONFIDENCE_RULES[0]

    def heldout(self, features) -> tuple[np.ndarray, np.ndarray] | None:
        """(deferral scores, disagreement with the teacher) of yesterday's student, under its
        rule, on the previous run's fresh rows it was not trained on (validation and
        calibration, from the pool); None: none there. Computed once."""
        if self._heldout is None:
            x, probs = pool_arrays(_previous_heldout(self.pool(), self.history), features)[:2]
            if not len(x):
                self._heldout = (None,)  # looked for, none there
            else:
                scores, pred = mc.rule_scores(self.student(), x, self.rule)
                self._heldout = (scores, pred != probs.argmax(axis=1))
        return None if self._heldout[0] is None else self._heldout


def begin(c, plan, store, teacher_sha256: str, base=None) -> Continual:
    """The state this run starts from (``base``, the store's current generation read by the
    caller; None: read here), checked; a warm run's fresh sample size set in
    ``plan.sample_rows`` (unless --sample-rows was given). ValueError (StateError) in one line."""
    if base is None and not c.state_reset:
        base = store.current()
    teacher = {"path": storage.absolute(c.job.teacher.path), "sha256": teacher_sha256}
    schema = feature_schema(plan)
    if base is not None:
        store.check_compatible(base, teacher_sha256, schema)
    cont = Continual(store, base, teacher, schema, c.state_pool_rows)
    if cont.warm:
        cap = plan.sample_rows  # the cold start's size on these rows
        if c.sample_rows is not None:  # the user's size, in the warm run's proportions
            sizes = fresh_sample.fresh_sample_sizes(plan.rows, c.eps, c.level, 10 ** 12)
            scale = c.sample_rows / sizes["total"]
            cont.sizes = {k: int(sizes[k] * scale) for k in ("cal", "val")}
            cont.sizes.update(train=c.sample_rows - cont.sizes["cal"] - cont.sizes["val"],
                              total=c.sample_rows, predicted_deferral=None)
        else:
            heldout = cont.heldout(plan.features) if c.eps is not None else None
            if heldout is not None and len(plan.x):
                # yesterday's rows predict today's only if today's look like them: the
                # student's scores on the rows read at launch (no teacher needed), KS-tested
                x = np.asarray(plan.x).reshape(len(plan.x), -1)  # as the pool's rows
                scores = mc.rule_scores(cont.student(), x, cont.rule)[0]
                cont.launch_shift = mc.scores_shift(scores, heldout[0])
                if cont.launch_shift[2]:
                    heldout = None  # shifted: the fixed rule, not a prediction
            cont.sizes = fresh_sample.fresh_sample_sizes(plan.rows, c.eps, c.level, cap, heldout)
        plan.sample_rows = cont.sizes["total"]
    return cont


def describe(cont: Continual, state: str) -> str:
    if cont.base is None:
        return f"state {state}: empty (or --state-reset): a cold start; generation 1 is written"
    s = cont.sizes or {}
    predicted, shift = s.get("predicted_deferral"), cont.launch_shift
    return (f"state {state}: generation {cont.base.generation} ({len(cont.history)} run(s), pool "
            f"{cont.base.meta.get('pool', {}).get('rows', 0):,} rows); warm start: fresh sample "
            f"{s.get('total', 0):,} = {s.get('cal', 0):,} calibration + {s.get('val', 0):,} "
            f"validation + {s.get('train', 0):,} fine-tune rows"
            + ("" if predicted is None else
               f" (the fewest expected teacher rows: yesterday's student, on the previous run's "
               f"held-out rows, predicts {predicted:.1%} of the other rows deferred)")
            + (f" (today's rows read at launch look shifted to yesterday's student, KS "
               f"{shift[0]:.3f}: the sample certifies a bar of EPS/2, not a prediction)"
               if shift is not None and shift[2] else ""))


def taken_by_state(jd, cont: Continual) -> int | None:
    """The state's generation when its newest run is the finished job in DIR (a --resume
    after the commit: nothing left to do), else None."""
    if cont.base is None or not storage.exists(jd.path("_SUCCESS")):
        return None
    try:
        report = storage.read_json(jd.path("report.json"))
    except Exception:  # noqa: BLE001 - no readable report: not finished
        return None
    lineage = cont.base.meta.get("lineage") or [{}]
    run_id = report.get("label_run_id")
    return cont.base.generation if run_id and lineage[-1].get("run_id") == run_id else None


# --------------------------------------------------------------------------- phase 3, warm

def _load(path: str):
    from titans.transforms.io.models import load_model_file

    return load_model_file(path, "cpu")


def pool_arrays(pool: pa.Table | None, features) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                         np.ndarray]:
    """(models' input, teacher probabilities, fine-tune weights: HARD_WEIGHT for hard rows,
    the hard rows' mask) of the pool rows."""
    if pool is None or pool.num_rows == 0:
        return (np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32), np.zeros((2, 0)),
                np.zeros(0, bool))
    x, reasons = feature_matrix(pool, features)
    probs = np.stack(pool.column(PROBS).to_numpy(zero_copy_only=False)).astype(np.float32)
    hard = pc.equal(pool.column("origin"), "hard").to_numpy(zero_copy_only=False)
    index = pool.column("run_index").to_numpy()
    age = index.max() - index
    weights = np.stack([np.where(hard, mc.HARD_WEIGHT, 1.0), mc.row_weights(hard, age, True)])
    if reasons is not None:
        ok = np.array([r is None for r in reasons])
        x, probs, weights, hard = x[ok], probs[ok], weights[:, ok], hard[ok]
    return x.reshape(len(x), -1), probs, weights, hard  # weights: [plain, after a shift]


def _previous_heldout(pool: pa.Table | None, history: list[dict]) -> pa.Table | None:
    """The previous run's fresh rows its student was not trained on (validation and
    calibration), from the pool: the reference set of the KS test."""
    if pool is None or not history or FRESH_SPLIT not in pool.column_names:
        return None
    run_id = history[-1].get("run_id")
    mask = pc.and_(pc.equal(pool.column("run_id"), run_id),
                   pc.is_in(pool.column(FRESH_SPLIT), pa.array(["val", "cal"])))
    rows = pool.filter(mask)
    return rows if rows.num_rows else None


def _fine_tune_budget(cont: Continual, started: float) -> float:
    """Seconds left for the fine-tune: within the distil phase's cap (mc.fine_tune_seconds,
    from ``started``) and the job's deadline (mc.fine_tune_end, from the command's start)."""
    now = time.time()
    left = mc.fine_tune_seconds(cont.history) - (now - started)
    end = mc.fine_tune_end(cont.history)
    if end is not None and cont.job_start is not None:
        left = min(left, end - (now - cont.job_start))
    return max(0.0, left)


def warm_distil(c, plan, s, split: Split, jd, cont: Continual, report=print) -> dict:
    """Phase 3 of a warm run: drift, fine-tune, champion / challenger -> DIR/student.pt; the
    facts phases.json and report.json keep (the fields distil.run gives, plus ``continual``)."""
    from titans.models.student_search import flops_per_row, ltt_bar
    from titans.transforms.io.models import save_torchscript

    started = time.time()  # the phase's budget (mc.fine_tune_seconds) counts from here
    base = cont.base
    meta = base.meta.get("student", {})
    config = meta.get("config", {})
    # the champion is only scored (and saved if kept); the challenger is fine-tuned: its own copy
    champion, challenger = cont.student(), _load(base.student_path)
    x = s.x.reshape(len(s.x), -1)
    tpred = s.teacher_pred
    pool = cont.pool()
    x_pool, p_pool, w_pool, hard_pool = pool_arrays(pool, plan.features)

    # drift: yesterday's student on today's fresh rows (it never saw them), against its
    # agreement on yesterday's held-out rows and their deferral scores
    scores_today, pred_today = mc.rule_scores(champion, x, cont.rule)
    before = cont.heldout(plan.features)
    scores_before = None if before is None else before[0]
    reference = (cont.history[-1].get("student_agreement") if cont.history else None)
    d = mc.drift(pred_today == tpred, reference, scores_today, scores_before)
    report(drift_line(d.record()))

    # after a shift (today's, or the previous run's) recent rows weigh more
    after_shift = d.shifted or bool((cont.history[-1].get("drift") or {}).get("shifted")
                                    if cont.history else False)
    arch = meta.get("arch") or config.get("arch", "?")
    archs, flops_of = {"champion": arch, "challenger": arch}, {}
    # one size up while the budget has room: the pool outgrows the width the cold search
    # picked on day 1's sample (models/continual.py, GROW_FACTOR)
    grown = mc.grow(champion, c.student_budget * plan.teacher_flops,
                    seed=c.job.seed + len(cont.history))
    if grown is not None:
        challenger, archs["challenger"], flops_of["challenger"] = grown
        report(f"    the challenger is yesterday's student widened to {grown[1]} units "
               f"({grown[2]:,.0f} FLOPs per row, budget "
               f"{c.student_budget * plan.teacher_flops:,.0f})")
    ft = mc.fine_tune(challenger, x_pool, p_pool, x[split.train], s.probs[split.train],
                      pool_weights=w_pool[1 if after_shift else 0],
                      today_share=mc.SHIFT_TODAY_SHARE if after_shift else None,
                      pool_hard=hard_pool,
                      steps=mc.FINE_TUNE_STEPS * (mc.SHIFT_STEPS_FACTOR if after_shift else 1),
                      seconds=_fine_tune_budget(cont, started),
                      seed=c.job.seed + len(cont.history))
    ft["after_shift"] = after_shift
    ft["grown_to"] = None if grown is None else grown[1]
    flops_of["champion"] = mc.vector_flops(champion) or flops_per_row(champion, x[:8])[0]
    flops_of.setdefault("challenger", flops_of["champion"])
    target = (mc.Target(deferral_rate=c.deferral_rate) if c.eps is None else
              mc.Target(bar=ltt_bar(len(split.cal), c.eps, c.level)))
    rules = (c.rule,) if c.rule else CONFIDENCE_RULES
    scored = {name: mc.score(m, x[split.val], tpred[split.val], target, rules, c.audit_rate,
                             flops_of[name] / plan.teacher_flops, s.probs[split.val])
              for name, m in (("champion", champion), ("challenger", challenger))}
    kept = mc.champion_challenger(scored["champion"], scored["challenger"], len(split.val))
    best, model = scored[kept], (champion if kept == "champion" else challenger)
    arch, flops = archs[kept], flops_of[kept]
    share = flops / plan.teacher_flops
    report(f"    champion (yesterday's student): teacher share needed {scored['champion'].deferral:.1%}"
           f", validation agreement {scored['champion'].val_agreement:.2%}, KL "
           f"{_num(scored['champion'].kl)}; challenger ({archs['challenger']}, fine-tuned "
           f"{ft['steps']} steps on "
           f"{ft['rows_pool']:,} pool + {ft['rows_today']:,} fresh rows, {ft['seconds']:.1f} s):"
           f" {scored['challenger'].deferral:.1%}, {scored['challenger'].val_agreement:.2%}, KL "
           f"{_num(scored['challenger'].kl)} -> {kept} kept")
    parameters = int(sum(p.numel() for p in model.parameters()))
    candidates = []
    for name, cand in scored.items():
        m = champion if name == "champion" else challenger
        rec = cand.record()
        rec.update(smooth=getattr(cand, "smooth", None), kl=getattr(cand, "kl", None))
        rec.update(arch=f"{archs[name]} ({name})", flops_per_row=flops_of[name],
                   parameters=int(sum(p.numel() for p in m.parameters())),
                   train_seconds=ft["seconds"] if name == "challenger" else 0.0)
        candidates.append(rec)
    facts = {"arch": arch, "rule": best.rule, "flops_per_row": flops, "flops_share": share,
             "parameters": parameters, "val_agreement": best.val_agreement,
             "val_deferral": best.deferral, "teacher_flops_per_row": plan.teacher_flops,
             "teacher_parameters": plan.teacher_parameters, "compute_proxy": plan.proxy,
             "token_vocab": None, "budget_flops_per_row": c.student_budget * plan.teacher_flops,
             "ltt_bar": target.bar,
             "split_rows": {"train": len(split.train), "validation": len(split.val),
                            "calibration": len(split.cal)},
             "training": {"method": "kd, warm start", **ft}, "candidates": candidates,
             "continual": {"kept": kept, "drift": d.record(), "generation": base.generation,
                           "parent_sha256": meta.get("sha256"), "pool_rows_used": len(x_pool)}}
    save_torchscript(model, jd.student, {
        "method": "kd", "arch": arch, "feature_columns": list(plan.features.columns)
        if not isinstance(plan.features, ImageSpec) else [plan.features.column],
        "feature_dim": x.shape[1], "num_classes": plan.num_classes, "outputs": plan.num_classes,
        "seed": c.job.seed, "teacher": storage.absolute(c.job.teacher.path),
        "train_rows": len(x_pool) + len(split.train), "val_rows": len(split.val),
        "rule": best.rule, "titans_label": {k: v for k, v in facts.items() if k != "candidates"}})
    return facts


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def drift_line(d: dict) -> str:
    drop = d.get("agreement_drop")
    ks = d.get("ks_statistic")
    return ("drift: yesterday's student agrees with the teacher on "
            f"{d['fresh_agreement']:.2%} of today's fresh rows"
            + (f" (vs {d['reference_agreement']:.2%} on the previous run's held-out rows: "
               f"{-drop:+.2%})" if drop is not None else "")
            + (f"; deferral scores vs the previous run's: KS {ks:.3f}, p {d['ks_pvalue']:.3g}"
               if ks is not None else "; no previous scores to compare (empty pool)")
            + (" -> SHIFT: the teacher's share rises today; calibration is on today's rows, so "
               "the guarantee holds" if d["shifted"] else " -> no shift detected"))


def heldout_agreement(jd, s, split: Split) -> float:
    """The kept student's agreement with the teacher on today's validation and calibration
    rows (neither trained on): tomorrow's drift reference."""
    from titans.models.forward import forward_in_chunks
    from titans.transforms.io.models import load_model_file

    rows = np.concatenate([split.val, split.cal])
    if rows.size == 0:
        return float("nan")
    model = load_model_file(jd.student, "cpu")
    pred = forward_in_chunks(model, s.x[rows], 65536).argmax(dim=-1).numpy()
    return float((pred == s.teacher_pred[rows]).mean())


__all__ = ["Continual", "begin", "describe", "warm_distil", "drift_line", "heldout_agreement",
           "feature_schema", "model_columns", "pool_arrays", "PROBS", "FRESH_SPLIT", "HISTORY_PNG"]
