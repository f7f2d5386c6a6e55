"""Scheduling: the Airflow DAG's launch body (built without Airflow) and the Cloud Scheduler
job's HTTP body are valid flexTemplates:launch requests whose parameters the template's
metadata accepts (known names, required ones present, regexes matched)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METADATA = json.loads((ROOT / "deploy" / "dataflow" / "metadata.json").read_text())


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mm = load(ROOT / "deploy" / "dataflow" / "make_metadata.py")
dag_file = load(ROOT / "deploy" / "airflow" / "titans_daily.py")


def check_launch_request(body: dict) -> None:
    """Strictly a LaunchFlexTemplateRequest body (unknown fields and wrong types fail), with
    parameters the template accepts."""
    from google.cloud.dataflow_v1beta3.types import templates
    from google.protobuf import json_format

    json_format.ParseDict(body, templates.LaunchFlexTemplateRequest.pb()(),
                          ignore_unknown_fields=False)
    launch = body["launchParameter"]
    assert launch["containerSpecGcsPath"].startswith("gs://")
    assert mm.check_parameters(launch["parameters"], METADATA) == []
    params = launch["parameters"]
    # the teacher alone asks for the GPU; workers run the launcher's image
    assert params["teacher_accelerator"].startswith("type:")
    assert "sdk_container_image" in params
    assert "worker_accelerator" not in json.dumps(body)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", launch["jobName"]), launch["jobName"]


def test_dag_module_imports_without_airflow():
    if importlib.util.find_spec("airflow") is None:
        assert dag_file.DAG is None
    assert callable(dag_file.launch_body)


def test_daily_launch_body_is_valid_for_a_date():
    body = dag_file.launch_body("2026-11-28", bucket="my-bucket",
                                template="gs://my-bucket/templates/titans-1.json",
                                image="us-central1-docker.pkg.dev/p/titans/titans:1")
    check_launch_request(body)
    params = body["launchParameter"]["parameters"]
    assert params["input"] == "gs://my-bucket/events/dt=2026-11-28/"
    assert params["output"] == "gs://my-bucket/labels/dt=2026-11-28"
    assert params["overwrite"] == "true"  # a retried day replaces its own outputs
    assert body["launchParameter"]["jobName"] == "titans-daily-2026-11-28"


def test_one_job_name_per_partition_and_no_suffix():
    """Dataflow refuses a second active job of the same name: the name must be the same on
    every try of a day (no random suffix) and differ between days."""
    kwargs = dag_file.flex_template_kwargs("2026-11-28")
    assert kwargs["append_job_name"] is False
    again = dag_file.flex_template_kwargs("2026-11-28")
    assert kwargs["body"]["launchParameter"]["jobName"] == \
        again["body"]["launchParameter"]["jobName"] == "titans-daily-2026-11-28"
    other = dag_file.flex_template_kwargs("2026-11-29")["body"]["launchParameter"]["jobName"]
    assert other != kwargs["body"]["launchParameter"]["jobName"]


def test_operator_waits_synchronously_whatever_default_deferrable_says():
    """default_deferrable=True would make the operator deferrable, which rejects
    wait_until_finished: deferrable=False is passed explicitly."""
    kwargs = dag_file.flex_template_kwargs()
    assert kwargs["deferrable"] is False and kwargs["wait_until_finished"] is True
    assert dag_file.label_job_kwargs("2026-11-28", state="gs://b/state")["deferrable"] is False


def test_launch_bodies_carry_a_launcher_machine_type_and_disk():
    for body in (dag_file.launch_body("2026-11-28"),
                 json.loads(fill((SCHEDULER / "launch_body.json").read_text(), VALUES))):
        env = body["launchParameter"]["environment"]
        assert re.fullmatch(r"[a-z]\d?[a-z]?\d-(standard|highmem|highcpu)-\d+",
                            env["launcherMachineType"]), env
        assert env["launcherMachineType"] != "n1-standard-1"  # Dataflow's default: too small
        assert env["diskSizeGb"] >= 50


def test_a_missing_provider_fails_the_import_with_what_to_install():
    """Here Airflow's providers are not installed: the DAG file's operator import must raise
    ImportError naming the packages, not leave a file without a DAG."""
    try:
        import airflow.providers.google  # noqa: F401
        pytest.skip("the Google provider is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError) as e:
        dag_file._operators()
    assert "pip install apache-airflow-providers-google apache-airflow-providers-apache-beam" \
        in str(e.value)


def parse_label(args: list[str]):
    """titans' own command line (titans flags, then the Beam options it accepts)."""
    from titans.pipeline.cli.main import build_parser, parse

    label = next(a for a in build_parser()._actions if a.dest == "command").choices["label"]
    if "--state" not in label._option_string_actions:
        pytest.skip("titans label has no --state yet (issue 18)")
    parsed, beam_args = parse(args)
    assert parsed.command == "label"
    return parsed, beam_args


def test_state_route_runs_titans_label_with_the_state_directory():
    """TITANS_STATE switches the DAG to `titans label --state gs://...` (a Cloud Run job of the
    same image): its arguments parse with titans' own command line."""
    args = dag_file.label_args("2026-11-28", state="gs://bkt/state/titans", bucket="bkt",
                               teacher="gs://bkt/models/teacher.pt", image="img:1", project="p")
    assert args[args.index("--state") + 1] == "gs://bkt/state/titans"
    assert args[args.index("--input") + 1] == "gs://bkt/events/dt=2026-11-28/"
    with pytest.raises(ValueError, match="TITANS_STATE"):
        dag_file.label_args("2026-11-28", state="")
    parsed, beam_args = parse_label(args)
    assert parsed.state == "gs://bkt/state/titans" and parsed.resume
    assert parsed.teacher_accelerator.startswith("type:nvidia-l4;")
    assert "--runner" in beam_args and "DataflowRunner" in beam_args
    from apache_beam.options.pipeline_options import PipelineOptions

    from titans.pipeline.options import check_accelerators

    check_accelerators(PipelineOptions(beam_args), parsed.teacher_accelerator)
    kwargs = dag_file.label_job_kwargs("2026-11-28", state="gs://bkt/state/titans")
    assert kwargs["overrides"]["container_overrides"][0]["args"][0] == "label"


def test_daily_launch_body_carries_the_airflow_template():
    """What the DAG hands the operator: Jinja that Airflow renders per run."""
    body = dag_file.launch_body("{{ ds }}")
    assert body["launchParameter"]["parameters"]["input"].endswith("/events/dt={{ ds }}/")
    rendered = json.loads(json.dumps(body).replace("{{ ds }}", "2026-01-31"))
    check_launch_request(rendered)


def test_default_settings_validate():
    check_launch_request(dag_file.launch_body("2026-11-28"))


def test_extra_parameters_are_checked_too():
    body = dag_file.launch_body("2026-11-28", extra_parameters={"audit_rate": "0.05"})
    check_launch_request(body)
    bad = dag_file.launch_body("2026-11-28", extra_parameters={"audit_share": "0.05"})
    assert mm.check_parameters(bad["launchParameter"]["parameters"], METADATA)


SCHEDULER = ROOT / "deploy" / "scheduler"


def fill(text: str, values: dict) -> str:
    for key, value in values.items():
        text = text.replace("${" + key + "}", value)
    assert "${" not in text
    return text


VALUES = {"PROJECT": "proj", "BUCKET": "bkt", "IMAGE": "us-central1-docker.pkg.dev/proj/titans/titans:1",
          "TEMPLATE": "gs://bkt/templates/titans-1.json"}


def test_cloud_scheduler_body_is_valid():
    body = json.loads(fill((SCHEDULER / "launch_body.json").read_text(), VALUES))
    check_launch_request(body)


def test_cloud_scheduler_script_posts_the_filled_body(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    fake = bin_dir / "gcloud"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\nargs = sys.argv[1:]\nrecord = {{'args': args}}\n"
        "if '--message-body-from-file' in args:\n"
        "    record['body'] = open(args[args.index('--message-body-from-file') + 1]).read()\n"
        f"open({str(log)!r}, 'a').write(json.dumps(record) + '\\n')\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               SCHEDULER_SA="sched@proj.iam.gserviceaccount.com", **VALUES)
    done = subprocess.run(["bash", str(SCHEDULER / "create_job.sh")], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    (call,) = [json.loads(line) for line in log.read_text().splitlines()]
    args = call["args"]
    assert args[:4] == ["scheduler", "jobs", "create", "http"]
    assert args[args.index("--uri") + 1] == ("https://dataflow.googleapis.com/v1b3/projects/proj/"
                                             "locations/us-central1/flexTemplates:launch")
    assert args[args.index("--http-method") + 1] == "POST"
    assert args[args.index("--oauth-token-scope") + 1] == \
        "https://www.googleapis.com/auth/cloud-platform"
    body = json.loads(call["body"])
    check_launch_request(body)
    assert body["launchParameter"]["parameters"]["sdk_container_image"] == VALUES["IMAGE"]


def test_cloud_scheduler_script_refuses_missing_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in VALUES and k != "SCHEDULER_SA"}
    done = subprocess.run(["bash", str(SCHEDULER / "create_job.sh")], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode != 0 and "PROJECT" in done.stderr


CLOUDRUN = ROOT / "deploy" / "cloudrun"


def gcloud_list(value: str) -> list[str]:
    """gcloud's ARG,... list syntax, with its '^DELIM^' alternative delimiter."""
    delim = ","
    if value.startswith("^"):
        delim, value = value[1:].split("^", 1)
    return value.split(delim)


def test_cloud_run_scripts_create_the_job_and_run_the_dags_label_arguments(tmp_path):
    """create_job.sh makes a Cloud Run job of the image with `titans` as its command;
    run_label.sh executes it with exactly the arguments the DAG's state route passes, which
    titans' command line accepts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    (bin_dir / "gcloud").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    (bin_dir / "gcloud").chmod(0o755)
    settings = {"PROJECT": "p", "REGION": "us-central1", "BUCKET": "bkt", "IMAGE": "img:1",
                "STATE": "gs://bkt/state/titans", "INPUT": "gs://bkt/events/dt=2026-11-28/",
                "OUTPUT": "gs://bkt/labels/dt=2026-11-28",
                "TEACHER": "gs://bkt/models/teacher.pt", "FEATURE_COLUMNS": "a,b"}
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **settings)
    for script in ("create_job.sh", "run_label.sh"):
        done = subprocess.run(["bash", str(CLOUDRUN / script)], capture_output=True,
                              text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
    create, execute = [json.loads(line) for line in log.read_text().splitlines()]
    assert create[:4] == ["run", "jobs", "create", "titans-label"]
    assert create[create.index("--image") + 1] == "img:1"
    assert create[create.index("--command") + 1] == "titans"
    assert execute[:4] == ["run", "jobs", "execute", "titans-label"] and "--wait" in execute
    args = gcloud_list(execute[execute.index("--args") + 1])
    assert args == dag_file.label_args("2026-11-28", state=settings["STATE"], bucket="bkt",
                                       teacher=settings["TEACHER"], image="img:1",
                                       feature_columns="a,b", project="p",
                                       region="us-central1")
    parsed, _ = parse_label(args)
    assert parsed.feature_columns == "a,b" and parsed.state == settings["STATE"]
