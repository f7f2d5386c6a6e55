"""deploy/dataflow/launch.py, the Flex Template entry point: template parameters back to titans
flags, a local run end to end, and a Flex-Template-style launch on DataflowRunner (job graph
written to --template_location on a local GCS emulator) that returns without waiting and
hands Dataflow a graph where only the teacher step asks for a GPU, in our image."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_dataset

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "deploy" / "dataflow" / "launch.py"
HINT = "type:nvidia-l4;count:1;machine_type:g2-standard-4;install-nvidia-driver"
IMAGE = "us-central1-docker.pkg.dev/proj/titans/titans:test"


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch = load(LAUNCH)


def test_parameters_become_titans_flags():
    args = launch.to_cli_args([
        "--input=gs://b/in/", "--teacher_batch_size=8192", "--feature_columns=a,b",
        "--overwrite=true", "--threshold=", "--id_column", "id",
        "--runner=DataflowRunner", "--project=p", "--sdk_container_image=img",
        "--teacher-device=cuda"])
    assert args == ["--input=gs://b/in/", "--teacher-batch-size=8192", "--feature-columns=a,b",
                    "--overwrite", "--id-column=id", "--runner=DataflowRunner", "--project=p",
                    "--sdk_container_image=img", "--teacher-device=cuda"]
    assert launch.to_cli_args(["--overwrite=false", "--overwrite=", "--audit_rate="]) == []
    assert launch.to_cli_args(["--overwrite"]) == ["--overwrite"]
    with pytest.raises(SystemExit):
        launch.to_cli_args(["--overwrite=maybe"])


def test_describe_is_refused_a_template_launch_must_submit_a_job():
    for arg in ("--describe=true", "--describe"):
        with pytest.raises(SystemExit) as e:
            launch.main(["--input=gs://b/in/", arg, "--runner=DataflowRunner"])
        assert "must submit a job" in str(e.value.code)


def test_options_nobody_knows_are_dropped_not_fatal():
    args = ["--input=gs://b/in/", "--launcher_only_option=1", "--runner=DataflowRunner",
            "--sdk_container_image=img", "--teacher-batch-size=8"]
    assert launch.drop_unknown(args) == ["--input=gs://b/in/", "--runner=DataflowRunner",
                                         "--sdk_container_image=img", "--teacher-batch-size=8"]


def test_launch_runs_the_cascade_on_a_local_runner(tmp_path, models):
    write_dataset(tmp_path / "data", 600, files=1)
    student, teacher = models
    cmd = [sys.executable, str(LAUNCH), f"--input={tmp_path / 'data'}",
           f"--output={tmp_path / 'out'}", f"--student={student}", f"--teacher={teacher}",
           "--deferral_rate=0.25", "--teacher_batch_size=128", "--overwrite=false",
           "--id_column=id", "--threshold=", "--runner=FnApiRunner", "--some_launcher_flag=x"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows_in"] == 600 and report["rows_hard"] == 150


def test_launch_refuses_what_titans_run_refuses(tmp_path, models, capsys):
    student, teacher = models
    code = launch.main([f"--input={tmp_path / 'nothing'}", f"--output={tmp_path / 'out'}",
                        f"--student={student}", f"--teacher={teacher}", "--runner=FnApiRunner"])
    assert code == 2 and "no non-empty file matches" in capsys.readouterr().err


@pytest.fixture
def gcs(gcs_bucket):
    """The session's local GCS JSON API (conftest.gcs_bucket) with a bucket 'bkt' of its own;
    its endpoint."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    endpoint = os.environ["STORAGE_EMULATOR_HOST"]
    client = storage.Client(project="proj", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": endpoint})
    if client.lookup_bucket("bkt") is None:
        client.create_bucket("bkt")
    return endpoint


def test_template_launch_hands_dataflow_a_graph_with_the_gpu_on_the_teacher_only(
        tmp_path, models, gcs, monkeypatch, capsys):
    from apache_beam.internal.gcp import auth
    from apache_beam.portability.api import beam_runner_api_pb2
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs)
    # no credentials on this machine: connect anonymously at once, not after google.auth's
    # ~20 s of retries
    monkeypatch.setattr(auth._Credentials, "_credentials_init", True)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)
    write_dataset(tmp_path / "data", 300, files=1)
    student, teacher = models
    # what Dataflow's launcher passes: the template parameters, then its own Beam options
    argv = [f"--input={tmp_path / 'data'}", "--output=gs://bkt/labels/dt=2026-11-28",
            f"--student={student}", f"--teacher={teacher}", "--deferral_rate=0.2",
            f"--teacher_accelerator={HINT}", "--teacher_min_ram=16GB", "--teacher_device=cuda",
            "--overwrite=true", f"--sdk_container_image={IMAGE}",
            "--runner=DataflowRunner", "--project=proj", "--region=us-central1",
            "--temp_location=gs://bkt/tmp", "--staging_location=gs://bkt/staging",
            "--template_location=gs://bkt/template_launches/1/job_object"]
    start = time.time()
    assert launch.main(argv) == 0
    assert "job graph handed to Dataflow" in capsys.readouterr().out
    assert time.time() - start < 120  # returned without waiting for any job

    bucket = storage.Client(project="proj", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": gcs}).bucket("bkt")
    job = json.loads(bucket.blob("template_launches/1/job_object").download_as_bytes())
    assert job["type"] == "JOB_TYPE_BATCH"
    pools = job["environment"]["workerPools"]
    images = [c for p in pools for c in p.get("sdkHarnessContainerImages", [])]
    assert len(images) >= 2 and {c["containerImage"] for c in images} == {IMAGE}
    options = job["environment"]["sdkPipelineOptions"]["options"]
    assert not any("worker_accelerator" in o for o in options.get("dataflow_service_options") or [])

    url = options["pipelineUrl"]
    assert url.startswith("gs://bkt/")
    proto = beam_runner_api_pb2.Pipeline.FromString(
        bucket.blob(url[len("gs://bkt/"):]).download_as_bytes())
    envs = proto.components.environments
    for env in envs.values():
        if env.urn == "beam:env:docker:v1":
            payload = beam_runner_api_pb2.DockerPayload.FromString(env.payload)
            assert payload.container_image == IMAGE
    hinted = {t.unique_name: dict(envs[t.environment_id].resource_hints)
              for t in proto.components.transforms.values()
              if t.environment_id in envs and envs[t.environment_id].resource_hints}
    teacher_steps = [n for n in hinted if n.split("/")[0] == "ScoreTeacher"]
    assert teacher_steps, sorted(hinted)
    assert not [n for n in hinted if n.split("/")[0] != "ScoreTeacher"]
    assert "ToTeacherWorkers" in {t.unique_name for t in proto.components.transforms.values()}
    hints = hinted[teacher_steps[0]]
    assert hints["beam:resources:accelerator:v1"] == HINT.encode()
    assert int(hints["beam:resources:min_ram_bytes:v1"]) == 16 * 10**9
    # report.json is the job's to write: nothing was run here
    assert not bucket.blob("labels/dt=2026-11-28/report.json").exists()


def test_template_launch_with_nothing_to_label_still_hands_dataflow_a_job(
        tmp_path, models, gcs, monkeypatch, capsys):
    """--skip-labeled with every input file labeled: a Flex Template launch that left no job
    graph would be reported as a failed launch (failing the schedule), so the launcher hands
    Dataflow a one-step job that logs why there is nothing to do; no model step, no GPU."""
    from apache_beam.internal.gcp import auth
    from apache_beam.portability.api import beam_runner_api_pb2
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs)
    monkeypatch.setattr(auth._Credentials, "_credentials_init", True)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)
    write_dataset(tmp_path / "data", 300, files=2)
    student, teacher = models
    common = [f"--input={tmp_path / 'data'}", f"--student={student}", f"--teacher={teacher}",
              f"--skip_labeled={tmp_path / 'manifest.json'}"]
    assert launch.main([*common, f"--output={tmp_path / 'first'}", "--runner=FnApiRunner"]) == 0
    argv = [*common, "--output=gs://bkt/labels/again", f"--teacher_accelerator={HINT}",
            f"--sdk_container_image={IMAGE}", "--runner=DataflowRunner", "--project=proj",
            "--region=us-central1", "--temp_location=gs://bkt/tmp",
            "--staging_location=gs://bkt/staging",
            "--template_location=gs://bkt/template_launches/2/job_object"]
    capsys.readouterr()
    assert launch.main(argv) == 0
    assert "already labeled" in capsys.readouterr().out

    bucket = storage.Client(project="proj", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": gcs}).bucket("bkt")
    job = json.loads(bucket.blob("template_launches/2/job_object").download_as_bytes())
    url = job["environment"]["sdkPipelineOptions"]["options"]["pipelineUrl"]
    proto = beam_runner_api_pb2.Pipeline.FromString(
        bucket.blob(url[len("gs://bkt/"):]).download_as_bytes())
    names = {t.unique_name.split("/")[0] for t in proto.components.transforms.values()}
    assert "NothingToLabel" in names and "ScoreTeacher" not in names
    assert not any(env.resource_hints for env in proto.components.environments.values())
