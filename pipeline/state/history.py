"""A ``--state`` directory's per-run history, at a glance: a text table and ``history.png``.

The history is a list of dicts, one per run, written by the label job (``history.json`` in a
generation folder). Every field is optional here: a column or a panel shows what the entries
carry. The fields read: run_id, time, mode, rows, sample_rows, predicted_deferral,
teacher_rows {sample, hard, audit, checks, total}, teacher_share, threshold, rule, eps, delta,
guarantee, audit_disagreement, fresh_agreement, drift {agreement_drop, ks_statistic,
ks_pvalue, shifted}, student {sha256, parent_sha256, kept}, job_wall_seconds or
phase_seconds {...}.
"""
from __future__ import annotations

import io


def _get(entry: dict, *keys):
    for key in keys:
        if not isinstance(entry, dict):
            return None
        entry = entry.get(key)
    return entry


def _num(v, fmt: str) -> str:
    return "" if not isinstance(v, (int, float)) or isinstance(v, bool) else format(v, fmt)


def _pct(v) -> str:
    return "" if not isinstance(v, (int, float)) else f"{v:.1%}"


def _drift(entry: dict) -> str:
    drift = entry.get("drift")
    if not isinstance(drift, dict):
        return ""
    parts = []
    if isinstance(drift.get("agreement_drop"), (int, float)):
        parts.append(f"drop {drift['agreement_drop']:+.3f}")
    if isinstance(drift.get("ks_pvalue"), (int, float)):
        parts.append(f"KS p {drift['ks_pvalue']:.2g}")
    if drift.get("shifted"):
        parts.append("SHIFT")
    return " ".join(parts)


def _deferred(entry: dict) -> str:
    """The share of the rows outside the sample that the cascade sent to the teacher."""
    hard, rows, drawn = _get(entry, "teacher_rows", "hard"), entry.get("rows"), entry.get(
        "sample_rows")
    ok = all(isinstance(v, (int, float)) for v in (hard, rows, drawn)) and rows > drawn
    return _pct(hard / (rows - drawn)) if ok else ""


def _seconds(entry: dict) -> str:
    if isinstance(entry.get("job_wall_seconds"), (int, float)):
        return _num(entry["job_wall_seconds"], ".0f")
    phases = entry.get("phase_seconds")
    if not isinstance(phases, dict):
        return ""
    return _num(sum(v for v in phases.values() if isinstance(v, (int, float))), ".0f")


# (header, how to show one entry); a column whose cells are all empty is left out
COLUMNS = (
    ("run", lambda i, e: str(i + 1)),
    ("run id", lambda i, e: str(e.get("run_id") or "")[:12]),
    ("time", lambda i, e: str(e.get("time") or "")[:19].replace("T", " ")),
    ("mode", lambda i, e: str(e.get("mode") or "")),
    ("rows", lambda i, e: _num(e.get("rows"), ",d")),
    ("drawn", lambda i, e: _num(e.get("sample_rows"), ",d")),
    # what the warm run sized its sample on, beside what the cascade then deferred
    ("pred. def.", lambda i, e: _pct(e.get("predicted_deferral"))),
    ("deferred", lambda i, e: _deferred(e)),
    ("sample", lambda i, e: _num(_get(e, "teacher_rows", "sample"), ",d")),
    ("hard", lambda i, e: _num(_get(e, "teacher_rows", "hard"), ",d")),
    ("audit", lambda i, e: _num(_get(e, "teacher_rows", "audit"), ",d")),
    ("checks", lambda i, e: _num(_get(e, "teacher_rows", "checks"), ",d")),
    ("teacher", lambda i, e: _num(_get(e, "teacher_rows", "total"), ",d")),
    ("share", lambda i, e: _pct(e.get("teacher_share"))),
    ("rule", lambda i, e: str(e.get("rule") or "")),
    ("threshold", lambda i, e: _num(e.get("threshold"), ".4g")),
    ("eps", lambda i, e: _num(e.get("eps"), "g")),
    ("delta", lambda i, e: _num(e.get("delta"), "g")),
    ("audit dis.", lambda i, e: _pct(e.get("audit_disagreement"))),
    ("fresh agr.", lambda i, e: _pct(e.get("fresh_agreement"))),
    ("drift", lambda i, e: _drift(e)),
    ("student", lambda i, e: str(_get(e, "student", "sha256") or "")[:8]),
    ("kept", lambda i, e: str(_get(e, "student", "kept") or "")),
    ("seconds", lambda i, e: _seconds(e)),
)


def table(history: list[dict]) -> str:
    """The history as a fixed-width text table, one line per run (oldest first)."""
    if not history:
        return "(no runs recorded)"
    cells = [[show(i, e if isinstance(e, dict) else {}) for i, e in enumerate(history)]
             for _, show in COLUMNS]
    cols = [(h, c) for (h, _), c in zip(COLUMNS, cells) if any(c) or h == "run"]
    same = [(h, c[0]) for h, c in cols if h in ("eps", "delta") and len(set(c)) == 1]
    cols = [(h, c) for h, c in cols if h not in dict(same)]  # said once, below
    widths = [max(len(h), *(len(x) for x in c)) for h, c in cols]
    left = {"run id", "time", "mode", "rule", "drift", "student", "kept"}
    fmt = lambda h, x, w: x.ljust(w) if h in left else x.rjust(w)  # noqa: E731
    lines = ["  ".join(fmt(h, h, w) for (h, _), w in zip(cols, widths)).rstrip()]
    for r in range(len(history)):
        lines.append("  ".join(fmt(h, c[r], w) for (h, c), w in zip(cols, widths)).rstrip())
    if same:
        lines.append("every run: " + ", ".join(f"{h} {v}" for h, v in same))
    guarantees = [(i + 1, e.get("guarantee")) for i, e in enumerate(history)
                  if isinstance(e, dict) and e.get("guarantee")]
    if guarantees:
        i, text = guarantees[-1]
        lines.append(f"guarantee of run {i}: {text}")
    return "\n".join(lines)


def png(history: list[dict]) -> bytes:
    """history.png: the teacher's share, the threshold and the fresh-sample agreement by run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = list(range(1, len(history) + 1))
    series = (("teacher's share of rows", lambda e: e.get("teacher_share")),
              ("threshold", lambda e: e.get("threshold")),
              ("previous student's agreement\non today's fresh sample",
               lambda e: e.get("fresh_agreement")))
    fig = Figure(figsize=(6.4, 6.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(series), 1, sharex=True)
    for ax, (title, pick) in zip(axes, series):
        points = [(r, pick(e)) for r, e in zip(runs, history)
                  if isinstance(e, dict) and isinstance(pick(e), (int, float))]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        shifted = [r for r, e in zip(runs, history)
                   if isinstance(e, dict) and _get(e, "drift", "shifted")]
        for r in shifted:
            ax.axvline(r, color="tab:red", alpha=0.3)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)  # a share: its fall read against zero
    rules = [(r, e.get("rule")) for r, e in zip(runs, history)
             if isinstance(e, dict) and isinstance(e.get("threshold"), (int, float))]
    for i, (r, rule) in enumerate(rules):  # thresholds of different rules are not comparable
        if rule and (i == 0 or rules[i - 1][1] != rule):
            axes[1].annotate(str(rule), (r, history[r - 1]["threshold"]), fontsize=7,
                             textcoords="offset points", xytext=(6, 0), va="center")
    axes[-1].set_xlabel("run (red: drift detected)")
    if runs:
        axes[-1].set_xticks(runs if len(runs) <= 20 else runs[::max(1, len(runs) // 20)])
    fig.suptitle(f"titans --state history: {len(history)} run(s)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot(history: list[dict], path: str) -> None:
    """Write ``history.png`` to ``path`` (local or URL)."""
    from titans.transforms.io import storage

    storage.write_bytes(path, png(history))
