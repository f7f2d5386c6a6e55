"""Write deploy/dataflow/metadata.json, the Flex Template's parameters, from `titans run`'s flags.

    python deploy/dataflow/make_metadata.py           # (re)write metadata.json
    python deploy/dataflow/make_metadata.py --check   # exit 1 if metadata.json is stale
    python deploy/dataflow/make_metadata.py --check-body BODY.json
                                                      # check a flexTemplates:launch body

One template parameter per `titans run` flag (but --describe: a template launch must submit
a job), named like the flag's argparse dest
(`--teacher-batch-size` -> `teacher_batch_size`), because Dataflow hands parameters to the
launcher as `--name=value`; deploy/dataflow/launch.py turns them back into titans flags.
The flags are read from `titans.pipeline.cli.main.build_parser()`, so a new flag changes the
generated file and tests/test_deploy_template.py fails until it is regenerated.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

METADATA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metadata.json")

# Regexes are checked by Dataflow before the launcher starts (and by check_parameters here).
# They use the subset of regex syntax that Java, RE2 and Python read the same way.
GCS_PATH = r"^gs://[^\n\r]+$"
MODEL_PATH = r"^(gs://|/)[^\n\r]+$"  # gs:// or a path baked into the container image
POSITIVE_INT = r"^[1-9][0-9]*$"
INT = r"^-?[0-9]+$"
FLOAT = r"^[-+]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?|[iI][nN][fF]([iI][nN][iI][tT][yY])?)$"
SHARE = r"^(0(\.[0-9]*)?|\.[0-9]+|1(\.0*)?)$"  # a number in [0, 1]
BOOLEAN = r"^(true|false)$"
REGEXES = {
    "input": GCS_PATH,
    "output": GCS_PATH,
    "student": MODEL_PATH,
    "teacher": MODEL_PATH,
    "calibration": MODEL_PATH,
    "deferral_model": MODEL_PATH,
    "skip_labeled": GCS_PATH,
    "student_class": r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$",
    "teacher_class": r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$",
    "student_class_kwargs": r"^\{.*\}$",
    "teacher_class_kwargs": r"^\{.*\}$",
    "feature_columns": r"^[^,\s]+(\s*,\s*[^,\s]+)*$",
    "deferral_rate": SHARE,
    "audit_rate": SHARE,
    "max_dead_letter_rate": SHARE,
    "student_device": r"^(cpu|cuda(:[0-9]+)?|gpu|auto)$",
    "teacher_device": r"^(cpu|cuda(:[0-9]+)?|gpu|auto)$",
    "teacher_accelerator": r"^type:[^;\s]+(;[^;\s]+)*$",
    "teacher_min_ram": r"^[0-9]+(\.[0-9]+)?\s*([KMGTP]i?B|B)$",
    "column_prefix": r"^[A-Za-z0-9_]*$",
    "batch_size": POSITIVE_INT,
    "teacher_batch_size": POSITIVE_INT,
    "sample_rows": POSITIVE_INT,
}


def run_parser() -> argparse.ArgumentParser:
    """The `titans run` subparser of the command line."""
    from titans.pipeline.cli.main import build_parser

    parser = build_parser()
    for action in parser._actions:  # pylint: disable=protected-access
        if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
            return action.choices["run"]
    raise RuntimeError("titans' command line has no `run` subcommand")


# `titans run` flags that are not template parameters: --describe prints the job graph and
# submits nothing, and a Flex Template launch that leaves no job is a failed launch
NOT_PARAMETERS = {"describe"}


def run_actions(parser: argparse.ArgumentParser | None = None) -> list[argparse.Action]:
    """Every `titans run` flag that is a template parameter (not -h/--help, not
    NOT_PARAMETERS), in the parser's order."""
    parser = parser or run_parser()
    return [a for a in parser._actions  # pylint: disable=protected-access
            if a.option_strings and not isinstance(a, argparse._HelpAction)  # pylint: disable=protected-access
            and a.dest not in NOT_PARAMETERS]


def long_flag(action: argparse.Action) -> str:
    return next(s for s in action.option_strings if s.startswith("--"))


def is_switch(action: argparse.Action) -> bool:
    """A flag that takes no value (store_true); as a template parameter it is true/false."""
    return action.nargs == 0


def help_text(action: argparse.Action, prog: str) -> str:
    """The flag's --help text with %(default)s and friends filled in, as argparse prints it."""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    text = (action.help or "") % params
    return " ".join(text.split())


def parameter(action: argparse.Action, prog: str) -> dict:
    name = action.dest
    flag = long_flag(action)
    usage = flag if is_switch(action) else f"{flag} {action.metavar or name.upper()}"
    param = {
        "name": name,
        "label": name.replace("_", " ").capitalize(),
        "helpText": f"{help_text(action, prog)} (titans run {usage})",
        "isOptional": not action.required,
    }
    if is_switch(action):
        param["paramType"] = "BOOLEAN"
        param["regexes"] = [BOOLEAN]
    elif action.choices:
        param["paramType"] = "ENUM"
        param["enumOptions"] = [{"value": str(c)} for c in action.choices]
        param["regexes"] = ["^(" + "|".join(re.escape(str(c)) for c in action.choices) + ")$"]
    elif action.type in (int, float) or REGEXES.get(name) in (SHARE, INT, POSITIVE_INT, FLOAT):
        param["paramType"] = "NUMBER"
        param["regexes"] = [REGEXES.get(name, INT if action.type is int else FLOAT)]
    else:
        param["paramType"] = "TEXT"
        if name in REGEXES:
            param["regexes"] = [REGEXES[name]]
    return param


def build_metadata() -> dict:
    parser = run_parser()
    return {
        "name": "titans run: label a Parquet dataset with a student/teacher cascade",
        "description": (
            "Label every row of a Parquet dataset with titans' model cascade: a small student "
            "scores every row, rows whose deferral score is above the threshold go to the "
            "teacher, which is the only step that asks for a GPU (right fitting). Parameters "
            "are `titans run`'s flags (--flag-name -> flag_name); Dataflow and Beam options "
            "such as the worker image go in the launch environment "
            "(environment.sdkContainerImage) or as extra parameters (sdk_container_image)."),
        "streaming": False,
        "parameters": [parameter(a, parser.prog) for a in run_actions(parser)],
    }


def render(metadata: dict) -> str:
    return json.dumps(metadata, indent=2, ensure_ascii=False) + "\n"


def beam_option_names() -> set[str]:
    """Every Beam pipeline option (dest names, e.g. sdk_container_image): Dataflow passes
    those on to the launcher as --name=value too, so they are valid template parameters."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    return {a.dest for a in parser._actions if a.option_strings} - {"help"}  # pylint: disable=protected-access


def check_parameters(parameters: dict, metadata: dict, beam_options: set[str] | None = None
                     ) -> list[str]:
    """What is wrong with a launch request's ``parameters`` against the template's metadata:
    names that are neither a template parameter nor a Beam pipeline option, missing required
    parameters, values that are not strings or do not match a parameter's regexes."""
    beam_options = beam_option_names() if beam_options is None else beam_options
    known = {p["name"]: p for p in metadata["parameters"]}
    errors = [f"unknown parameter {name!r}: neither a titans run flag nor a Beam option"
              for name in parameters if name not in known and name not in beam_options]
    errors += [f"required parameter {name!r} is missing"
               for name, p in known.items() if not p.get("isOptional") and name not in parameters]
    for name, value in parameters.items():
        if not isinstance(value, str):
            errors.append(f"parameter {name!r} must be a string, not {type(value).__name__}")
            continue
        for regex in known.get(name, {}).get("regexes", []):
            if not re.search(regex, value):
                errors.append(f"parameter {name}={value!r} does not match {regex}")
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=METADATA_PATH, help="where to write (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="only check that --out is up to date")
    ap.add_argument("--check-body", metavar="BODY.json",
                    help="check the parameters of a flexTemplates:launch request body")
    a = ap.parse_args(argv)
    text = render(build_metadata())
    if a.check_body:
        with open(a.check_body, encoding="utf-8") as f:
            body = json.load(f)
        errors = check_parameters(body["launchParameter"].get("parameters", {}), json.loads(text))
        for e in errors:
            print(f"{a.check_body}: {e}", file=sys.stderr)
        return 1 if errors else 0
    if a.check:
        try:
            with open(a.out, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print(f"{a.out} is stale: run python deploy/dataflow/make_metadata.py", file=sys.stderr)
            return 1
        return 0
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {a.out} ({len(json.loads(text)['parameters'])} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
