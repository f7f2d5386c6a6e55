"""Flex Template entry point: `titans run` on the launcher VM, handing the job to Dataflow.

The image sets FLEX_TEMPLATE_PYTHON_PY_FILE to this file. Dataflow's launcher runs it as
`python launch.py --input=gs://... --teacher_batch_size=8192 ... --runner=DataflowRunner
--project=... --region=... --temp_location=... --template_location=gs://.../job_object`:
the template parameters (named like metadata.json, i.e. argparse dests) plus Beam options.

What differs from `titans run`:
  * parameters come as --dest=value; they are turned back into titans flags
    (--teacher_batch_size=8192 -> --teacher-batch-size=8192, --overwrite=true -> --overwrite,
    --overwrite=false and empty values -> dropped);
  * options that are neither titans flags nor Beam options (the launcher's own) are left out
    with a warning, as a plain Beam program would, instead of failing the launch;
  * --runner defaults to DataflowRunner, not the DirectRunner (a launcher VM must never run
    the job itself);
  * on Dataflow it returns as soon as the job is handed over (titans' launch with
    wait=False). `titans run` waits for the job and then rereads and rewrites report.json,
    but under a Flex Template Beam only writes the job graph to --template_location (no job
    id, nothing to wait for, no report yet) and the launcher must exit promptly. The job
    writes report.json and then _SUCCESS itself when its writers are done (and, with
    --skip-labeled, its manifest); only the post-run fields (wall time restated from launch
    to finish, runner name, the pipeline's counters) are missing from that report.

Local runners (--runner FnApiRunner, DirectRunner) run the plain `titans run`, which is how
the tests exercise this file without Google Cloud.
"""
from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_metadata import is_switch, long_flag, run_actions  # noqa: E402

_LOG = logging.getLogger("titans")
TRUE = {"true", "1", "yes", "on"}
FALSE = {"false", "0", "no", "off", ""}


def to_cli_args(argv: list[str]) -> list[str]:
    """Template parameters (--dest=value) -> `titans run` flags; anything else is left as is
    (Beam and Dataflow options)."""
    actions = {a.dest: a for a in run_actions()}
    for a in list(actions.values()):  # a flag given in its own spelling is accepted too
        actions.setdefault(long_flag(a)[2:], a)
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        action = actions.get(name)
        if action is None:
            out.append(arg)
            continue
        if is_switch(action):
            if not eq:
                out.append(long_flag(action))
            elif value.strip().lower() in TRUE:
                out.append(long_flag(action))
            elif value.strip().lower() not in FALSE:
                raise SystemExit(f"launch.py: {name}={value!r} must be true or false")
            continue
        if not eq:  # --flag VALUE as two arguments
            if i >= len(argv):
                raise SystemExit(f"launch.py: {arg} needs a value")
            value = argv[i]
            i += 1
        if value == "":  # an unset optional parameter: use titans' default
            continue
        out.append(f"{long_flag(action)}={value}")
    return out


def drop_unknown(args: list[str]) -> list[str]:
    """Leave out options that are neither titans flags nor Beam options, with a warning.

    `titans run` rejects such flags (a typo should not be dropped silently), but the launcher
    may add options of its own that this Beam version does not know; a plain Beam program
    drops those (PipelineOptions discards unparseable args), and so does this entry point."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    known = {s for a in parser._actions for s in a.option_strings}  # pylint: disable=protected-access
    known |= {s for a in run_actions() for s in a.option_strings}
    kept = []
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            _LOG.warning("launch.py: ignoring %s: neither a titans run flag nor a Beam option", arg)
            continue
        kept.append(arg)
    return kept


def runner_of(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--runner" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--runner="):
            return arg.split("=", 1)[1]
    return None


def is_dataflow(runner: str | None) -> bool:
    return runner is not None and runner.split(".")[-1] in ("DataflowRunner", "Dataflow")


def run_and_return(cli_args: list[str]) -> int:
    """`titans run` up to the job submission: the same flag checks, launch-time plan (files,
    schema, models, threshold) and output preparation, then Pipeline.run(), and return
    instead of waiting for the job and reading its report (titans' run_job(wait=False))."""
    from titans.pipeline.cli import main as cli
    from titans.pipeline.cli.console import run_reporting_errors
    from titans.pipeline.job import launch

    args, beam_args = cli.parse(cli_args)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("titans").setLevel(args.log_level)
    return run_reporting_errors("run", lambda: launch(cli.job_config(args), beam_args,
                                                      wait=False))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.split("=", 1)[0] in ("--describe",) for a in argv):
        # not a template parameter (make_metadata.NOT_PARAMETERS): it would submit no job
        raise SystemExit("launch.py: describe is not a template parameter: a template launch "
                         "must submit a job; run `titans run ... --describe` where titans is "
                         "installed to see the stages")
    args = drop_unknown(to_cli_args(argv))
    runner = runner_of(args)
    if runner is None:
        args.append("--runner=DataflowRunner")
        runner = "DataflowRunner"
    if not is_dataflow(runner):
        from titans.pipeline.cli.main import main as titans_main

        return titans_main(["run", *args])
    if not any(a.split("=", 1)[0] in ("--sdk_container_image", "--worker_harness_container_image",
                                       "--setup_file", "--extra_package", "--extra_packages")
               for a in args):
        # not fatal: the image may also be set by the service (environment.sdkContainerImage)
        _LOG.warning("no --sdk_container_image: unless Dataflow sets the worker image, workers "
                     "start the stock Beam image, which has neither torch nor titans. Pass the "
                     "image this template was built from as parameter sdk_container_image.")
    return run_and_return(["run", *args])


if __name__ == "__main__":
    sys.exit(main())
