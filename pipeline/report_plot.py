"""``report.png``: the deferral scores of a run's easy and hard rows, drawn off the
critical path when the command line can arrange it.

Importing matplotlib and drawing a first figure costs ~0.35 s (measured on 2 CPUs), and the
figure can only be drawn once the job's counts are in: at the very end of every run. So the
``titans`` command starts a helper process first thing (``start_helper``, on an in-process
runner, where the report is drawn in the command's own process): it imports matplotlib and
draws a throwaway figure on a CPU the command's single-threaded start-up leaves idle, then
waits for the report on stdin and answers with the PNG on stdout. Anywhere else (a worker
process, a Dataflow job, a test calling the library), or if the helper is gone or fails, the
figure is drawn in-process, the same way. This module imports neither Beam nor torch: the
helper starts in ~0.1 s.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

_helper: subprocess.Popen | None = None


def start_helper() -> None:
    """Start the drawing helper of this process (the `titans` command calls it once)."""
    global _helper
    stop_helper()
    try:
        _helper = subprocess.Popen([sys.executable, "-m", "titans.pipeline.report_plot"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
    except OSError:  # no helper: the plot is drawn in-process, as anywhere else
        _helper = None


def stop_helper() -> None:
    """End an unused helper (it exits when its stdin closes)."""
    global _helper
    if _helper is not None:
        helper, _helper = _helper, None
        try:
            helper.stdin.close()
            helper.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            helper.kill()


def plot_scores(report: dict, path: str) -> None:
    """Write ``report.png`` for a report that has a deferral-score histogram."""
    if "deferral_score_histogram" not in report:
        return
    from titans.transforms.io.storage import write_bytes

    write_bytes(path, _from_helper(report) or scores_png(report))


def _from_helper(report: dict) -> bytes | None:
    global _helper
    helper, _helper = _helper, None  # used once
    if helper is None:
        return None
    try:
        png, _ = helper.communicate(json.dumps(report).encode(), timeout=60)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        helper.kill()
        return None
    return png if helper.returncode == 0 and png.startswith(b"\x89PNG") else None


def scores_png(report: dict) -> bytes:
    """Stacked histogram of deferral scores (easy vs hard rows) with the threshold marked;
    for `titans label` (prelabeled rows), also one bar of where every row went."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h = report["deferral_score_histogram"]
    edges = np.asarray(h["bin_edges"])
    whole = report.get("rows_prelabeled") is not None  # `titans label`: where every row went
    fig = Figure(figsize=(6, 5.6 if whole else 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2, 1, 1) if whole else fig.add_subplot()
    easy, hard = np.asarray(h["easy"]), np.asarray(h["hard"])
    # one filled outline per series, not 2 x 50 bars: half the drawing time, on every run
    ax.stairs(easy, edges, fill=True, label="easy: student labels")
    ax.stairs(easy + hard, edges, baseline=easy, fill=True, label="hard: teacher labels")
    threshold = report.get("threshold")
    if isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.4g}")
    ax.set_xlabel(f"deferral score ({report.get('rule')}; higher = harder)")
    ax.set_ylabel("rows")
    ax.set_title(f"{report['rows_easy'] + report['rows_deferred']:,} rows, "
                 f"{report['deferral_rate']:.1%} to the teacher")
    ax.legend(fontsize=8)
    if whole:
        _plot_row_sources(fig.add_subplot(2, 1, 2), report)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _plot_row_sources(ax, report: dict) -> None:
    """One bar of every row of a `titans label` job: who labeled it, or the dead letter."""
    parts = [("sample: teacher", report["rows_prelabeled"], "tab:purple"),
             ("easy: student", report["rows_easy"], "tab:blue"),
             ("hard: teacher", report["rows_hard"], "tab:orange"),
             ("dead letter", report["rows_dead_letter"], "tab:gray")]
    left = 0
    for name, rows, color in parts:
        ax.barh([0], [rows], left=left, color=color, label=f"{name} {rows:,}")
        left += rows
    ax.set_yticks([])
    ax.set_xlabel("rows")
    ax.set_title(f"{report['rows_in']:,} rows, {report['rows_to_teacher_share']:.1%} to the "
                 f"teacher (sample + hard + audited)")
    ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.35))


def _serve() -> None:
    """The helper: warm up, then draw the one report that arrives on stdin."""
    warm_up = {"deferral_score_histogram": {"bin_edges": [0.0, 0.5, 1.0], "easy": [1, 0],
                                            "hard": [0, 1]},
               "threshold": 0.5, "rule": "margin", "rows_easy": 1, "rows_deferred": 1,
               "deferral_rate": 0.5}
    scores_png(warm_up)  # imports, fonts, the renderer: all paid before the job ends
    data = sys.stdin.buffer.read()
    if data:
        sys.stdout.buffer.write(scores_png(json.loads(data)))
        sys.stdout.buffer.flush()
    os._exit(0)  # the command waits for this exit: skip unloading matplotlib (~50 ms)


if __name__ == "__main__":
    _serve()
