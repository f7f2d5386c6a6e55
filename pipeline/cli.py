"""The ``titans`` command line.

Every flag not listed here is handed to Beam as a pipeline option (``--runner``,
``--direct_num_workers``, ``--project``, ...); a flag neither side knows is an error.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from titans.pipeline.flags import add_model_flags, feature_columns, model_ref
from titans.pipeline.train import add_calibrate_parser, add_distill_parser, run_calibrate, run_distill

_LOG = logging.getLogger("titans")


def _add_input_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, metavar="PATTERN",
                   help="Parquet file, directory (its *.parquet files) or glob; local or a URL "
                        "of a Beam filesystem, such as gs://bucket/data/*.parquet")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="output directory (local or URL): labels/ (Parquet shards), "
                        "dead_letter/ (rows that could not be labeled, with the reason), "
                        "report.json and report.png")
    p.add_argument("--feature-columns", default="features", metavar="COL[,COL...]",
                   help="one vector column (list or fixed-size list of numbers) or several "
                        "numeric columns concatenated in order (default: %(default)s)")
    p.add_argument("--id-column", metavar="COL",
                   help="column that identifies a row; checked to exist (every input column "
                        "is passed through to the output anyway)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's outputs in a non-empty --output directory")
    p.add_argument("--batch-size", type=int, default=65536, metavar="N",
                   help="rows per Arrow batch read from Parquet and per student forward pass, "
                        "whatever the files' row-group size (default: %(default)s)")


def _add_teacher_stage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher-batch-size", type=int, default=16384, metavar="N",
                   help="rows per teacher forward pass; hard rows from several batches are "
                        "merged up to this size (default: %(default)s)")
    p.add_argument("--teacher-device", default="auto", metavar="DEVICE",
                   help="cpu, cuda or auto = cuda when the worker has a GPU; asking for cuda "
                        "on a worker without one fails rather than silently using the CPU "
                        "(default: %(default)s)")
    p.add_argument("--teacher-accelerator", metavar="HINT",
                   help="Beam resource hint for the teacher stage only, e.g. "
                        "'type:nvidia-l4;count:1;install-nvidia-driver' on Dataflow; "
                        "no effect on local runners")
    p.add_argument("--teacher-min-ram", metavar="SIZE",
                   help="Beam min_ram resource hint for the teacher stage, e.g. 16GB")
    p.add_argument("--column-prefix", default="", metavar="PREFIX",
                   help="prefix for the columns titans adds (label, confidence, ...), for an "
                        "input that already has a column of that name")
    p.add_argument("--sample-rows", type=int, default=100_000, metavar="N",
                   help="rows sampled (from up to 32 random row groups) before the pipeline "
                        "starts, to check the models on real rows and to set the threshold "
                        "for --deferral-rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sample and of --audit-rate (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="titans", allow_abbrev=False,
        description="Batch model cascades for offline labeling: a small student labels the "
                    "easy rows, a large teacher only the hard ones.")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level of titans' own messages (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", allow_abbrev=False, help="label a Parquet dataset with the cascade",
        description="Label every row of a Parquet dataset: the student scores all rows, rows "
                    "whose deferral score is above the threshold go to the teacher. Flags not "
                    "listed below are Beam pipeline options (default --runner DirectRunner).")
    _add_input_flags(run)
    add_model_flags(run, "student")
    add_model_flags(run, "teacher")
    run.add_argument("--rule", choices=["max_prob", "margin", "entropy", "defer_head", "learned"],
                     help="deferral score, higher = harder: max_prob = 1 - max p; margin = "
                          "1 - (p1 - p2); entropy = H(p)/log K; defer_head = p(defer) of a "
                          "`titans distill --method defer` student; learned = a post-hoc model, "
                          "see --deferral-model (default: margin)")
    how = run.add_mutually_exclusive_group()
    how.add_argument("--threshold", type=float, metavar="T",
                     help="send a row to the teacher when its deferral score > T")
    how.add_argument("--deferral-rate", type=float, metavar="R",
                     help="share of rows to send to the teacher (0-1); the threshold is the "
                          "(1-R) quantile of student scores on a sample of the input "
                          "(--sample-rows). Default when no --threshold: 0.2")
    how.add_argument("--calibration", metavar="CAL.json",
                     help="rule and threshold chosen by `titans calibrate` (for a budget or "
                          "with an accuracy guarantee); replaces --rule/--threshold/"
                          "--deferral-rate/--deferral-model")
    run.add_argument("--deferral-model", metavar="PATH",
                     help="trained post-hoc deferral model for --rule learned (written by "
                          "`titans calibrate`)")
    run.add_argument("--audit-rate", type=float, default=0.0, metavar="A",
                     help="also send a seeded random share A of the easy rows to the teacher; "
                          "their labels stay the student's, and the report gives the "
                          "student-teacher agreement on them with a 95%% confidence interval "
                          "(default: 0, no audit)")
    run.add_argument("--student-device", default="cpu", metavar="DEVICE",
                     help="cpu, cuda or auto (default: %(default)s)")
    _add_teacher_stage_flags(run)

    label = sub.add_parser(
        "teacher-label", allow_abbrev=False,
        help="label every row with the teacher, writing its class probabilities",
        description="The same Beam pipeline with the teacher on every row: writes label, "
                    "confidence and teacher_probs (all K probabilities) next to every input "
                    "column, so a student can be distilled (`titans distill --teacher-probs "
                    "teacher_probs`) from unlabeled data at scale. Flags not listed below are "
                    "Beam pipeline options.")
    _add_input_flags(label)
    add_model_flags(label, "teacher")
    _add_teacher_stage_flags(label)

    add_distill_parser(sub)
    add_calibrate_parser(sub)

    demo = sub.add_parser(
        "demo", allow_abbrev=False,
        help="train a student and a teacher on scikit-learn's digits and run the cascade",
        description="Builds a real dataset from scikit-learn's bundled handwritten digits, "
                    "trains a small student and a larger teacher (seconds on a CPU), saves "
                    "them as TorchScript and runs the same cascade as `titans run` on the "
                    "test split. Extra flags are Beam pipeline options.")
    demo.add_argument("--output", default="titans-demo-output", metavar="DIR",
                      help="where to write data, models and the run (default: %(default)s); "
                           "replaced if it holds a previous demo")
    demo.add_argument("--deferral-rate", type=float, default=0.2, metavar="R",
                      help="share of test rows sent to the teacher (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed for split and training")
    return parser


def check_beam_args(parser: argparse.ArgumentParser, args: list[str]) -> None:
    """Fail on flags that are neither ours nor a Beam option, instead of Beam dropping them."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    beam_parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(beam_parser)  # pylint: disable=protected-access
    _, unknown = beam_parser.parse_known_args(args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (neither a titans flag nor "
                     f"a Beam pipeline option; see titans {sys.argv[1] if len(sys.argv) > 1 else ''} --help)")


def _config(a: argparse.Namespace):
    from titans.pipeline.plan import RunConfig

    hints = {}
    if a.teacher_accelerator:
        hints["accelerator"] = a.teacher_accelerator
    if a.teacher_min_ram:
        hints["min_ram"] = a.teacher_min_ram
    cascade = a.command == "run"
    return RunConfig(
        input=a.input, output=a.output,
        student=model_ref(a, "student") if cascade else None,
        teacher=model_ref(a, "teacher"),
        feature_columns=feature_columns(a.feature_columns),
        id_column=a.id_column, batch_size=a.batch_size, teacher_batch_size=a.teacher_batch_size,
        column_prefix=a.column_prefix, overwrite=a.overwrite, sample_rows=a.sample_rows,
        seed=a.seed, teacher_resource_hints=hints,
        **({"rule": a.rule, "threshold": a.threshold, "deferral_rate": a.deferral_rate,
            "calibration": a.calibration, "deferral_model": a.deferral_model,
            "audit_rate": a.audit_rate} if cascade else {}))


def main(argv: list[str] | None = None) -> int:
    start = time.time()
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("titans").setLevel(args.log_level)
    check_beam_args(parser, beam_args)
    if args.command in ("run", "teacher-label"):
        from titans.pipeline.cascade import run_cascade
        from titans.pipeline.plan import plan_run
        from titans.pipeline.report import summary

        try:
            plan = plan_run(_config(args))
        except ValueError as e:  # launch-time checks: say what to fix, no traceback
            print(f"titans {args.command}: error: {e}", file=sys.stderr)
            return 2
        report = run_cascade(plan, beam_args, start)
        print(summary(report))
        print(f"labels: {plan.config.output}/labels/  report: {plan.config.output}/report.json")
    elif args.command == "distill":
        return run_distill(args)
    elif args.command == "calibrate":
        return run_calibrate(args)
    elif args.command == "demo":
        from titans.pipeline.demo import run_demo

        try:
            run_demo(args.output, args.deferral_rate, args.seed, beam_args)
        except ValueError as e:
            print(f"titans demo: error: {e}", file=sys.stderr)
            return 2
    return 0


def entry_point() -> None:
    """The `titans` command: main(), then exit without tearing the interpreter down.

    Unloading torch and Beam takes ~0.6 s after every command; by the time main() returns
    the pipeline has finished and every output file is closed, so only Python's own
    buffers need flushing.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry_point()
