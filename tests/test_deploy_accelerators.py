"""A GPU asked of Dataflow must come with a machine type that can carry it (L4 -> g2-*,
T4/V100/P100/P4 -> n1-*, A100 -> a2-*, H100 -> a3-*): the teacher's accelerator hint and a
worker_accelerator service option are checked at launch, on real PipelineOptions, and a bad
pair is refused in one line naming the fix before anything is written or submitted."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from titans.pipeline.options import check_accelerators, gpu_machine_problem

ROOT = Path(__file__).resolve().parents[1]
DATAFLOW = ["--runner=DataflowRunner", "--project=p", "--region=us-central1",
            "--temp_location=gs://b/tmp"]


def check(hint, *beam_args):
    check_accelerators(PipelineOptions([*DATAFLOW, *beam_args]), hint)


@pytest.mark.parametrize("gpu, machine", [
    ("nvidia-l4", "g2-standard-4"), ("nvidia-tesla-t4", "n1-standard-4"),
    ("nvidia-tesla-t4", "custom-4-16384"), ("nvidia-tesla-v100", "n1-highmem-8"),
    ("nvidia-tesla-a100", "a2-highgpu-1g"), ("nvidia-h100-80gb", "a3-highgpu-1g"),
    ("nvidia-some-new-gpu", "z9-standard-4")])  # unknown to the table: Dataflow decides
def test_pairs_that_fit(gpu, machine):
    assert gpu_machine_problem(gpu, machine) is None
    check(f"type:{gpu};count:1;machine_type:{machine};install-nvidia-driver")


@pytest.mark.parametrize("gpu, machine, fix", [
    ("nvidia-l4", "n1-standard-4", "g2-standard-4"), ("nvidia-l4", "n2-standard-4", "g2-"),
    ("nvidia-tesla-t4", "g2-standard-4", "n1-standard-4"),
    ("nvidia-tesla-a100", "n1-standard-8", "a2-"), ("nvidia-h100-80gb", "a2-highgpu-1g", "a3-")])
def test_a_hint_whose_machine_cannot_carry_the_gpu_is_refused(gpu, machine, fix):
    hint = f"type:{gpu};count:1;machine_type:{machine};install-nvidia-driver"
    with pytest.raises(ValueError) as e:
        check(hint)
    message = str(e.value)
    assert "\n" not in message and "--teacher-accelerator" in message
    assert gpu in message and machine in message and fix in message


def test_a_hint_without_machine_type_uses_the_jobs_machine_or_dataflows_default():
    hint = "type:nvidia-l4;count:1;install-nvidia-driver"
    with pytest.raises(ValueError, match="not n1-standard-1; put machine_type:g2-standard-4"):
        check(hint)  # Dataflow's default batch worker
    with pytest.raises(ValueError, match="not n2-standard-4"):
        check(hint, "--worker_machine_type=n2-standard-4")
    check(hint, "--machine_type=g2-standard-8")
    check("type:nvidia-tesla-t4;count:1;install-nvidia-driver")  # default n1 carries a T4


def test_worker_accelerator_service_option_is_checked_against_the_jobs_machine():
    option = "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
    with pytest.raises(ValueError, match="pass --machine_type g2-standard-4"):
        check(None, option, "--machine_type=n1-standard-4")
    check(None, option, "--machine_type=g2-standard-4")


def test_local_runners_ignore_hints_so_nothing_is_checked():
    check_accelerators(PipelineOptions(["--runner=FnApiRunner"]),
                       "type:nvidia-l4;count:1;machine_type:n1-standard-4")


@pytest.mark.parametrize("command", [["run", "--student", "s.pt"], ["label"]])
def test_titans_run_refuses_the_pair_in_one_line_before_anything_is_written(tmp_path, command):
    """The command line end to end on DataflowRunner: exit 2, one error line, no output
    (`titans label` too, before its sample phase)."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "titans.pipeline.cli.main", *command, "--input",
         str(tmp_path / "in"), "--output", str(out), "--teacher", "t.pt",
         "--teacher-accelerator", "type:nvidia-l4;count:1;machine_type:n1-standard-4", *DATAFLOW],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, done.stderr
    assert "nvidia-l4 GPU needs a g2-* machine type" in errors[0]
    assert "machine_type:g2-standard-4" in errors[0]
    assert not out.exists()
