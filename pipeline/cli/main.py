"""The ``titans`` command line.

The flags live in ``titans.pipeline.cli.flags`` (no torch, no Beam: `titans --help` answers at
once); each command imports what it needs after parsing. For run, teacher-label and demo,
every flag not listed is handed to Beam as a pipeline option (``--runner``,
``--direct_num_workers``, ``--project``, ...), and a flag neither side knows is an error;
distill and calibrate start no pipeline and accept only their own flags.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time

from titans.pipeline import defaults
from titans.pipeline.cli import startup
from titans.pipeline.cli.configs import job_fields
from titans.pipeline.cli.flags import BEAM_COMMANDS, build_parser
from titans.pipeline.cli.values import model_ref

_LOG = logging.getLogger("titans")

__all__ = ["build_parser", "check_beam_args", "entry_point", "fast_exit_is_safe", "job_config",
           "main", "parse"]


def check_beam_args(parser: argparse.ArgumentParser, command: str, args: list[str],
                    local: bool = False) -> None:
    """Fail on flags that are neither ours nor a Beam option, instead of Beam dropping them.
    ``local``: the job runs in this process and names no URL (see startup.import_beam)."""
    from titans.pipeline.cli.startup import import_beam

    import_beam(local)  # the first Beam import of a command
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    beam_parser = _BeamArgumentParser(allow_abbrev=False)
    _import_runner_options(args)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(beam_parser)  # pylint: disable=protected-access
    _, unknown = beam_parser.parse_known_args(args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (neither a titans flag nor "
                     f"a Beam pipeline option; see titans {command} --help)")


def _import_runner_options(beam_args: list[str]) -> None:
    """The Dask runner's options (--dask_client_address, ...) exist once its module is
    imported, which Beam leaves to the run: import it here when --runner names it."""
    if not any("dask" in arg.lower() for arg in beam_args):
        return  # no parser built for the other runners' commands
    from titans.pipeline.options import DASK_RUNNER, is_beam_dask

    options = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    options.add_argument("--runner")
    runner = options.parse_known_args(beam_args)[0].runner
    if runner and (is_beam_dask(runner) or runner == DASK_RUNNER):
        import apache_beam.runners.dask.dask_runner  # noqa: F401


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(titans flags, Beam pipeline options). Only run, teacher-label and demo take Beam
    options; for the other commands an unknown flag is an error (exit code 2)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, beam_args = parser.parse_known_args(_minus_inf_as_value(argv))
    if args.command in BEAM_COMMANDS:
        local = _starts_nothing_outside(args, beam_args) and not any("://" in a for a in argv)
        check_beam_args(parser, args.command, beam_args, local)
    elif beam_args:
        parser.error(f"unrecognized arguments: {' '.join(beam_args)} (titans {args.command} "
                     f"starts no Beam pipeline; see titans {args.command} --help)")
    _refuse_ignored_flags(parser, args)
    return args, beam_args


def _refuse_ignored_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A flag this combination would parse and then ignore is an error (exit code 2)."""
    if args.command == "run" and args.deferral_model and args.rule != "learned" \
            and not args.calibration:  # with --calibration, planning names every flag to drop
        parser.error(f"--deferral-model is the trained model of --rule learned; with --rule "
                     f"{args.rule or defaults.RULE} it would be ignored: add --rule learned or "
                     f"drop --deferral-model")


def _minus_inf_as_value(argv: list[str]) -> list[str]:
    """argparse reads a '-inf' after a flag as another flag ('--threshold -inf' fails):
    join it to its flag, '--threshold=-inf'."""
    out: list[str] = []
    for token in argv:
        if token.lower() in ("-inf", "-infinity") and out and out[-1].startswith("--") \
                and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def job_config(a: argparse.Namespace):
    """The RunConfig (`titans run`) or TeacherLabelConfig (`titans teacher-label`) of the flags."""
    from titans.pipeline.plan import RunConfig, TeacherLabelConfig

    common = dict(job_fields(a), sample_rows=a.sample_rows)
    if a.command == "teacher-label":
        return TeacherLabelConfig(**common)
    return RunConfig(student=model_ref(a, "student"), rule=a.rule, threshold=a.threshold,
                     deferral_rate=a.deferral_rate, calibration=a.calibration,
                     deferral_model=a.deferral_model, audit_rate=a.audit_rate, **common)


def main(argv: list[str] | None = None) -> int:
    start = time.time()
    # torch's OpenMP threads spin while they wait by default; next to the Parquet reader and
    # writer threads on a small machine that spinning cost 5-11% of a run (4M rows, 2 CPUs,
    # measured). Read when torch loads, so set before any import; the user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    startup.choose_arrow_allocator()
    args, beam_args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("titans").setLevel(args.log_level)
    from titans.pipeline.cli.console import run_reporting_errors

    command = COMMANDS[args.command]
    return run_reporting_errors(args.command, lambda: command(args, beam_args, start))


# every command: (flags, Beam's flags, when the command began) -> exit code; each imports what
# it needs only when it runs (`titans --help` stays light)
def _launch(args: argparse.Namespace, beam_args: list[str], start: float) -> int:
    from titans.pipeline.job import launch  # run, teacher-label: plan, run, summarise

    return launch(job_config(args), beam_args, start, describe=args.describe)


def _label(args: argparse.Namespace, beam_args: list[str], start: float) -> int:
    from titans.pipeline.label.command import run_label

    return run_label(args, beam_args, start)


def _distill(args: argparse.Namespace, beam_args: list[str], start: float) -> int:
    from titans.pipeline.commands.distill import run_distill

    return run_distill(args)


def _calibrate(args: argparse.Namespace, beam_args: list[str], start: float) -> int:
    from titans.pipeline.commands.calibrate import run_calibrate

    return run_calibrate(args)


def _demo(args: argparse.Namespace, beam_args: list[str], start: float) -> int:
    from titans.pipeline.commands.demo import run_demo

    run_demo(args.output, args.deferral_rate, args.seed, beam_args, args.format)
    return 0


def _state(args: argparse.Namespace, beam_args: list[str], start: float) -> int:
    from titans.pipeline.commands.state import run_state

    return run_state(args)


COMMANDS = {"run": _launch, "teacher-label": _launch, "label": _label, "distill": _distill,
            "calibrate": _calibrate, "demo": _demo, "state": _state}


# Beam runners that execute the pipeline in this process (DirectRunner's in-memory and
# multi-threaded modes run on the FnApiRunner), by their name without a "Runner" suffix
IN_PROCESS_RUNNERS = ("direct", "fnapi", "switchingdirect", "bundlebaseddirect")


def fast_exit_is_safe(argv: list[str]) -> bool:
    """Whether the command ``argv`` may end with os._exit, skipping interpreter teardown.

    Only when nothing it started needs an exit handler: distill and calibrate start no
    pipeline; run, teacher-label and demo only on an in-process runner (the default) with
    in-process workers. Portable runners (Prism, Flink, Spark, PortableRunner), Dataflow, and
    DirectRunner's multi_processing mode or non-embedded environments start job servers or
    worker processes that Beam stops from atexit handlers.
    """
    parsed = _parse_quietly(argv)
    return parsed is not None and _starts_nothing_outside(*parsed) and not _prism_started()


def _parse_quietly(argv: list[str]) -> tuple[argparse.Namespace, list[str]] | None:
    """(titans flags, the rest) of ``argv``, or None if it does not parse; quietly (main()
    says what is wrong)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return build_parser().parse_known_args(_minus_inf_as_value(argv))
        except SystemExit:
            return None


def _starts_nothing_outside(args: argparse.Namespace, beam_args: list[str]) -> bool:
    """What fast_exit_is_safe can tell from the flags alone (see there)."""
    if args.command not in BEAM_COMMANDS:
        return True
    options = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    for flag in ("--runner", "--direct_running_mode", "--environment_type"):
        options.add_argument(flag)
    beam, _ = options.parse_known_args(beam_args)
    runner = (beam.runner or defaults.RUNNER).rsplit(".", 1)[-1].lower()
    runner = runner[:-len("runner")] if runner.endswith("runner") else runner
    if runner not in IN_PROCESS_RUNNERS:
        return False
    if (beam.direct_running_mode or "in_memory") not in ("in_memory", "multi_threading"):
        return False
    return (beam.environment_type or "EMBEDDED").upper() == "EMBEDDED"


def _prism_started() -> bool:
    # the DirectRunner hands pipelines Prism supports to Prism (a job server in a subprocess)
    return "apache_beam.runners.portability.prism_runner" in sys.modules


def entry_point() -> None:
    """The `titans` command: main(), then exit, without interpreter teardown when safe.

    Unloading torch and Beam takes ~0.6 s after every command; by the time main() returns
    an in-process pipeline has finished and every output file is closed, so only Python's
    own buffers need flushing. Otherwise (see fast_exit_is_safe) the exit is a normal one,
    so Beam's atexit handlers stop the job servers and workers it started.
    """
    argv = sys.argv[1:]
    parsed = _parse_quietly(argv)  # once; main() parses for itself and reports errors
    command = parsed[0].command if parsed else None
    in_process = parsed is not None and _starts_nothing_outside(*parsed)
    if command in ("run", "teacher-label", "label", "demo"):
        startup.pause_gc()  # until the job runs (see titans.pipeline.cli.startup)
    if command in ("run", "label", "demo") and in_process:
        from titans.pipeline.report_plot import start_helper

        start_helper()  # report.png's matplotlib, imported on the idle CPU meanwhile
    code = main(argv)
    if not in_process or _prism_started():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry_point()
