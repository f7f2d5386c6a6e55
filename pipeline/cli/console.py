"""What the commands print: errors as `titans COMMAND: error: ...`, and the summaries of
`titans distill` and `titans calibrate`."""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np

REPORT_RATES = (0.05, 0.10, 0.20, 0.30)


def run_reporting_errors(command: str, body: Callable[[], int]) -> int:
    """``body()``'s exit code; 2 when it raises ValueError (a check at the edge: what to fix,
    one line, no traceback), printed as ``titans COMMAND: error: ...``; 1 when a job that ran
    failed and its runner gave up (``failures.JobError``: a lost model server, a CUDA error,
    a model failing on every row), printed as ``titans COMMAND: job failed: ...``. The one
    place every command's bad input or failed job becomes its exit code."""
    from titans.pipeline.failures import JobError

    try:
        return body()
    except ValueError as e:
        print(f"titans {command}: error: {e}", file=sys.stderr)
        return 2
    except JobError as e:
        print(f"titans {command}: job failed: {e}", file=sys.stderr)
        return 1


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def print_distill_summary(args, n_train: int, n_val: int, k: int, final: dict) -> None:
    print(f"student: MLP {args.student_arch} -> {k + (args.method == 'defer')} outputs, method "
          f"{args.method}, trained on {n_train:,} rows, validated on {n_val:,}")
    if n_val:
        line = f"final validation: agreement with the teacher {pct(final.get('val_agreement'))}"
        if final.get("val_accuracy") is not None:
            line += f", accuracy {pct(final['val_accuracy'])}"
        if args.method == "defer":
            line += f", defer output wins on {pct(final.get('val_defer_rate'))} of rows"
        print(line)
    print(f"saved: {args.out} (TorchScript)")
    if args.method == "defer":
        print("use it with --rule defer_head (titans calibrate / titans run): its last output "
              "is the deferral score")
    else:
        print("next: titans calibrate --student ... to choose the deferral rule and threshold")


def print_calibration(args, data: dict, skipped: str | None) -> None:
    """``data``: the CAL.json record."""
    n, ref = data["n_calibration_rows"], data["accuracy_reference"]
    what = "accuracy vs labels" if ref == "labels" else "agreement with the teacher (no labels)"
    if skipped:
        print(f"note: rule learned skipped: {skipped}")
    aside = (f", the other {data['n_fit_rows']:,} set aside to fit the learned rule"
             if data["n_fit_rows"] else "")
    print(f"curves on {n:,} rows{aside}; cascade {what}:")
    print(curve_table(data["curves"], data["rule"], data.get("comparison_only_rules", ())))
    if ref == "labels":
        print(f"teacher alone: {pct(data['teacher_accuracy'])}   student alone: "
              f"{pct(data['student_accuracy'])}")
    t = data["threshold"]
    print(f"operating point: rule {data['rule']}, threshold {t:.6g} ({data['method']}): "
          f"{data['deferral_rate']:.1%} of the calibration rows to the teacher, cascade "
          f"{pct(data['cascade_accuracy'])} ({'accuracy' if ref == 'labels' else 'agreement'})")
    if data["method"] == "budget":
        print("budget mode: no accuracy guarantee (use --max-accuracy-loss or --target-accuracy "
              "for one)")
    else:
        print(f"guarantee: {data['guarantee']['guarantee']}")
        if ref == "teacher":
            print("without --label-column the guarantee is relative to the teacher's answers, "
                  "not to the truth")
    print(f"calibration: {args.out}" + (f"  learned rule: {data['deferral_model']}"
                                        if "deferral_model" in data else ""))


def curve_table(curves: dict, chosen: str, comparison_only=()) -> str:
    """rule, AUC and cascade accuracy at 5/10/20/30% deferral, one line per rule."""
    head = f"  {'rule':<12}{'AUC':>8}" + "".join(f"{f'@{r:.0%}':>9}" for r in REPORT_RATES)
    lines = [head]
    for name, c in curves.items():
        at = [np.interp(r, c["deferral_rate"], c["accuracy"]) for r in REPORT_RATES]
        mark = " <- operating rule" if name == chosen else \
            " (comparison only)" if name in comparison_only else ""
        lines.append(f"  {name:<12}{c['auc']:>8.4f}" + "".join(f"{a:>9.2%}" for a in at) + mark)
    return "\n".join(lines)
