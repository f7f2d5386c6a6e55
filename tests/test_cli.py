"""`titans run` end to end as a subprocess, its launch-time errors, every flag's help, how fast
the command line answers, and how the command exits."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from conftest import DIM, RUNNER, write_dataset
from titans.models.architectures import MLP
from titans.transforms.io.models import save_torchscript
from titans.models import defaults as train_defaults
from titans.pipeline import defaults
from titans.pipeline.cli.main import build_parser, fast_exit_is_safe, job_config, main, parse
from titans.pipeline.cli.values import model_ref


def test_titans_run_end_to_end(tmp_path, models):
    data = tmp_path / "data"
    write_dataset(data, 2000)
    student, teacher = models
    cmd = [sys.executable, "-m", "titans.pipeline.cli.main", "run", "--input", str(data / "*.parquet"),
           "--output", str(tmp_path / "out"), "--student", student, "--teacher", teacher,
           "--id-column", "id", "--deferral-rate", "0.2", "--batch-size", "256"] + RUNNER
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "rows in: 2,000" in done.stdout and "deferral rate: 20.0%" in done.stdout

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("rows_in", "rows_easy", "rows_hard", "rows_dead_letter", "deferral_rate", "rule",
                "threshold", "wall_seconds", "rows_per_second", "teacher_rows_avoided",
                "teacher_compute_avoided_share"):
        assert key in report
    assert report["rows_in"] == 2000 and report["rows_hard"] == 400 and report["rule"] == "margin"
    labels = pq.read_table(tmp_path / "out" / "labels")
    assert labels.num_rows == 2000
    assert labels.schema.field("label").type == "int64"
    assert sorted(labels.column("id").to_pylist()) == list(range(2000))

    # a second run into the same directory is refused, then allowed with --overwrite
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert subprocess.run(cmd + ["--overwrite"], capture_output=True, timeout=300).returncode == 0


def _run(capsys, *args):
    code = main(["run", *args])
    return code, capsys.readouterr().err


@pytest.fixture
def setup(tmp_path, models):
    data = tmp_path / "data"
    write_dataset(data, 200, files=1)
    return str(data), str(tmp_path / "out"), models


def test_wrong_path(capsys, setup, tmp_path):
    _, out, (s, t) = setup
    code, err = _run(capsys, "--input", str(tmp_path / "nope"), "--output", out, "--student", s, "--teacher", t)
    assert code == 2 and "no non-empty file matches" in err


def test_missing_column(capsys, setup):
    data, out, (s, t) = setup
    code, err = _run(capsys, "--input", data, "--output", out, "--student", s, "--teacher", t,
                     "--feature-columns", "pixels")
    assert code == 2 and "'pixels'" in err and "--feature-columns" in err


def test_model_that_does_not_load(capsys, setup, tmp_path):
    data, out, (s, _) = setup
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"not a model")
    code, err = _run(capsys, "--input", data, "--output", out, "--student", s, "--teacher", str(bad))
    assert code == 2 and "--teacher: cannot load model" in err


def test_shape_and_class_mismatch(capsys, setup, tmp_path):
    data, out, (s, _) = setup
    wide = str(tmp_path / "wide.pt")
    save_torchscript(MLP(DIM + 3, 4, (5,)), wide)
    code, err = _run(capsys, "--input", data, "--output", out, "--student", s, "--teacher", wide)
    assert code == 2 and f"does not accept a float32 [batch, {DIM}] input" in err
    three = str(tmp_path / "three.pt")
    save_torchscript(MLP(DIM, 3, (5,)), three)
    code, err = _run(capsys, "--input", data, "--output", out, "--student", s, "--teacher", three)
    assert code == 2 and "must agree on the number of classes" in err


def test_state_dict_with_class(capsys, setup, tmp_path):
    data, out, (s, _) = setup
    torch.save(MLP(DIM, 4, (5,)).state_dict(), tmp_path / "sd.pt")
    code, err = _run(capsys, "--input", data, "--output", out, "--student", s,
                     "--teacher", str(tmp_path / "sd.pt"))
    assert code == 2 and "module:Class" in err  # a state_dict needs its class
    code, err = _run(capsys, "--input", data, "--output", out, "--student", s, "--teacher",
                     str(tmp_path / "sd.pt"), "--teacher-class", "titans.models.architectures:MLP",
                     "--teacher-class-kwargs", f'{{"in_features": {DIM}, "out_features": 4, "hidden": [5]}}',
                     *RUNNER)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rows_in"] == 200


def test_unknown_flag_is_an_error(capsys, setup):
    data, out, (s, t) = setup
    with pytest.raises(SystemExit):
        main(["run", "--input", data, "--output", out, "--student", s, "--teacher", t, "--thresold", "0.5"])
    assert "unrecognized arguments: --thresold" in capsys.readouterr().err


# every flag of every command, written out here rather than read from the parser
MODEL_FLAGS = {f"--{role}{suffix}" for role in ("student", "teacher")
               for suffix in ("", "-class", "-class-kwargs")}
# input format, images and token sequences: every command that reads data
DATA_FLAGS = {"--format", "--image-column", "--image-mode", "--image-size", "--image-mean",
              "--image-std", "--token-column", "--pad-id", "--max-length", "--overflow"}
JOB_FLAGS = {"--input", "--output", "--feature-columns", "--id-column", "--overwrite",
             "--batch-size", "--max-dead-letter-rate", "--trust-model-code",
             "--teacher-batch-size", "--teacher-device", "--teacher-accelerator",
             "--teacher-min-ram", "--column-prefix", "--sample-rows", "--seed",
             "--output-format", "--max-record-bytes"} | DATA_FLAGS
MODE_FLAGS = {"--skip-labeled", "--describe"}  # run and teacher-label only
FLAGS = {
    "run": JOB_FLAGS | MODEL_FLAGS | MODE_FLAGS | {
        "--rule", "--threshold", "--deferral-rate", "--calibration", "--deferral-model",
        "--audit-rate", "--student-device"},
    "teacher-label": JOB_FLAGS | MODE_FLAGS | {"--teacher", "--teacher-class",
                                               "--teacher-class-kwargs"},
    "distill": DATA_FLAGS | {"--train", "--feature-columns", "--label-column", "--teacher", "--teacher-class",
                "--teacher-class-kwargs", "--trust-model-code", "--teacher-probs", "--out",
                "--method", "--student-arch", "--target-deferral", "--epochs", "--lr",
                "--batch-size", "--temperature", "--alpha", "--val-fraction", "--seed"},
    "calibrate": MODEL_FLAGS | DATA_FLAGS | {"--input", "--feature-columns", "--label-column",
                                "--trust-model-code", "--out", "--rule", "--plot",
                                "--deferral-rate", "--max-accuracy-loss", "--target-accuracy",
                                "--delta", "--bound", "--seed"},
    "demo": {"--output", "--deferral-rate", "--seed", "--format"},
    "state": {"DIR"},  # positional: the --state directory
    "label": (JOB_FLAGS | {"--teacher", "--teacher-class", "--teacher-class-kwargs",
                           "--max-disagreement", "--deferral-rate", "--delta", "--student-budget",
                           "--rule", "--audit-rate", "--student-device", "--resume",
                           "--state", "--state-pool-rows", "--state-reset"}),
}
# flags whose argparse default is None but whose help must still say what happens without them
IMPLIED_DEFAULTS = {("run", "--rule"): defaults.RULE,
                    ("run", "--deferral-rate"): str(defaults.DEFERRAL_RATE),
                    ("calibrate", "--rule"): defaults.RULE,
                    ("calibrate", "--delta"): str(train_defaults.DELTA),
                    ("calibrate", "--bound"): train_defaults.BOUND,
                    ("label", "--max-disagreement"): "0.01", ("label", "--delta"): "0.1"}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"titans": parser, **sub.choices}


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--student", "--teacher", "--feature-columns", "--id-column",
                 "--rule", "--threshold", "--deferral-rate", "--batch-size", "--overwrite",
                 "--teacher-batch-size", "--teacher-accelerator", "--sample-rows"):
        assert flag in text

    commands = subcommands()
    assert set(commands) == {"titans", *FLAGS}
    for command, parser in commands.items():
        actions = [a for a in parser._actions if not isinstance(a, (argparse._HelpAction,
                                                                    argparse._SubParsersAction))]
        name = lambda a: (a.option_strings or [a.metavar])[0]  # noqa: E731 - a positional: its metavar
        flags = {name(a) for a in actions}
        assert flags == FLAGS.get(command, {"--log-level"}), command
        for action in actions:
            where = f"titans {command} {name(action)}"
            assert action.help and len(action.help) >= 20, f"{where}: help too short"
            help_text = " ".join((action.help % dict(vars(action), prog="titans")).split())
            default = IMPLIED_DEFAULTS.get((command, name(action)), action.default)
            if default not in (None, False, ""):
                assert str(default) in help_text, f"{where}: help does not give its default"


def test_parser_defaults_come_from_the_defaults_modules():
    args, _ = parse(["run", "--input", "i", "--output", "o", "--student", "s", "--teacher", "t"])
    assert (args.batch_size, args.teacher_batch_size, args.sample_rows,
            args.max_dead_letter_rate) == (defaults.BATCH_SIZE, defaults.TEACHER_BATCH_SIZE,
                                           defaults.SAMPLE_ROWS, defaults.MAX_DEAD_LETTER_RATE)
    args, _ = parse(["distill", "--train", "t", "--out", "o", "--method", "kd"])
    assert (args.epochs, args.lr, args.batch_size, args.temperature, args.alpha,
            args.val_fraction, args.target_deferral, args.student_arch) == (
        train_defaults.EPOCHS, train_defaults.LR, train_defaults.TRAIN_BATCH_SIZE,
        train_defaults.TEMPERATURE, train_defaults.ALPHA, train_defaults.VAL_FRACTION,
        train_defaults.TARGET_DEFERRAL, train_defaults.STUDENT_ARCH)
    assert parse(["demo"])[0].deferral_rate == defaults.DEFERRAL_RATE


def test_trust_model_code_and_dead_letter_budget_reach_the_job_config():
    base = ["--input", "i", "--output", "o", "--teacher", "t"]
    config = job_config(parse(["run", *base, "--student", "s"])[0])
    assert not config.teacher.trust_code and not config.student.trust_code
    assert config.max_dead_letter_rate == defaults.MAX_DEAD_LETTER_RATE
    config = job_config(parse(["run", *base, "--student", "s", "--trust-model-code",
                               "--max-dead-letter-rate", "0.5"])[0])
    assert config.teacher.trust_code and config.student.trust_code
    assert config.max_dead_letter_rate == 0.5
    config = job_config(parse(["teacher-label", *base, "--trust-model-code",
                               "--max-dead-letter-rate", "0"])[0])
    assert config.teacher.trust_code and config.max_dead_letter_rate == 0.0
    args, _ = parse(["calibrate", "--input", "i", "--student", "s", "--teacher", "t", "--out", "o",
                     "--trust-model-code"])
    assert model_ref(args, "student").trust_code and model_ref(args, "teacher").trust_code
    args, _ = parse(["distill", "--train", "i", "--teacher", "t", "--out", "o", "--method", "kd"])
    assert not model_ref(args, "teacher").trust_code
    assert "arbitrary code" in " ".join(
        [a for a in subcommands()["run"]._actions if "--trust-model-code" in a.option_strings][0]
        .help.split())


def test_max_dead_letter_rate_must_be_a_share(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["run", "--input", "i", "--output", "o", "--student", "s", "--teacher", "t",
               "--max-dead-letter-rate", "1.5"])
    assert e.value.code == 2 and "must be between 0 and 1" in capsys.readouterr().err


# ------------------------------------------------------------------ the command line is light

def test_building_the_parser_imports_no_heavy_library():
    code = ("import sys\n"
            "from titans.pipeline.cli.main import build_parser, parse\n"
            "build_parser()\n"
            "parse(['distill', '--train', 't', '--out', 'o', '--method', 'kd'])\n"
            "print(sorted(m for m in ('torch', 'apache_beam', 'pyarrow', 'numpy', 'sklearn',\n"
            "                         'scipy', 'matplotlib') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def titans_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "titans")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "titans.pipeline.cli.main"]


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help_answers_well_under_a_second(argv):
    times = []
    for _ in range(5):
        t = time.perf_counter()
        done = subprocess.run(titans_command() + argv, capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - t)
        assert done.returncode == 0 and "usage: titans" in done.stdout
    # ~0.05 s on a quiet machine (importing torch or Beam alone takes over 1 s)
    assert statistics.median(times) < 1.0, times


# ------------------------------------------------------------------ exit

@pytest.mark.parametrize("beam_args, safe", [
    ([], True),
    (["--runner", "FnApiRunner"], True),
    (["--runner=DirectRunner", "--direct_num_workers", "2"], True),
    (["--runner", "DirectRunner", "--direct_running_mode", "multi_threading"], True),
    (["--runner", "apache_beam.runners.direct.direct_runner.DirectRunner"], True),
    (["--runner", "DirectRunner", "--direct_running_mode", "multi_processing"], False),
    (["--direct_running_mode=multi_processing"], False),
    (["--runner", "FnApiRunner", "--environment_type", "PROCESS"], False),
    (["--runner", "PortableRunner", "--job_endpoint", "localhost:8099"], False),
    (["--runner", "PrismRunner"], False),
    (["--runner", "DataflowRunner", "--project", "p"], False),
    (["--runner", "FlinkRunner"], False),
])
def test_fast_exit_only_after_an_in_process_runner(beam_args, safe):
    run = ["run", "--input", "i", "--output", "o", "--student", "s", "--teacher", "t"]
    assert fast_exit_is_safe(run + beam_args) is safe
    assert fast_exit_is_safe(["teacher-label", *run[1:5], "--teacher", "t", *beam_args]) is safe
    assert fast_exit_is_safe(["demo", *beam_args]) is safe


def test_fast_exit_after_commands_without_a_pipeline():
    assert fast_exit_is_safe(["distill", "--train", "t", "--out", "o", "--method", "kd"])
    assert fast_exit_is_safe(["calibrate", "--input", "i", "--student", "s", "--teacher", "t",
                              "--out", "o"])


@pytest.mark.parametrize("runner, atexit_runs", [("FnApiRunner", False), ("PortableRunner", True)])
def test_entry_point_runs_exit_handlers_unless_the_runner_was_in_process(runner, atexit_runs):
    """The titans command as a process, its work stubbed out: a portable runner's job server
    is stopped by an atexit handler, which must run; after an in-process run there is none
    to wait for and teardown is skipped."""
    code = ("import atexit, sys\n"
            "from titans.pipeline.cli import main as cli\n"
            "atexit.register(lambda: print('exit handler ran', flush=True))\n"
            "cli.main = lambda argv: print('done', flush=True) or 3\n"
            "sys.argv = ['titans', 'run', '--input', 'i', '--output', 'o', '--student', 's',\n"
            f"            '--teacher', 't', '--runner', '{runner}']\n"
            "cli.entry_point()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout.split() == ["done"] + (["exit", "handler", "ran"] if atexit_runs else [])


def test_the_report_says_where_the_time_went(tmp_path, models):
    import json
    import subprocess
    import sys

    from conftest import RUNNER, write_dataset

    write_dataset(tmp_path / "data", 500, files=1)
    done = subprocess.run([sys.executable, "-m", "titans.pipeline.cli.main", "run", "--input",
                           str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--student",
                           models[0], "--teacher", models[1], *RUNNER],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    phases = report["phase_seconds"]
    assert list(phases) == ["startup", "imports", "input_listing_and_footers", "sampling",
                            "model_loading_and_checks", "pipeline_construction", "runner_start",
                            "processing", "finalisation", "report_and_plot"]
    assert all(s >= 0 for s in phases.values()) and phases["imports"] > 0.1
    # consecutive phases from the process's start: they add up to the wall time
    assert abs(sum(phases.values()) - report["wall_seconds"]) < 0.05
    assert "where the time went: startup" in done.stdout
