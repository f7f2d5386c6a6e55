"""Scheduling: the Airflow DAG's launch body (built without Airflow) and the Cloud Scheduler
job's HTTP body are valid flexTemplates:launch requests whose parameters the template's
metadata accepts (known names, required ones present, regexes matched)."""
from __future__ import annotations

import importlib.util
import json
import os
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
    import re
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


@pytest.mark.skipif(importlib.util.find_spec("airflow") is None, reason="Airflow not installed")
def test_dag_parses_in_airflow():
    """Runs where apache-airflow and its Google and Beam providers are installed."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "deploy" / "airflow"))
    assert not bag.import_errors
    dag = bag.dags["titans_daily"]
    (task,) = dag.tasks
    assert "body" in task.template_fields
    rendered = task.render_template(task.body, {"ds": "2026-11-28"},
                                    jinja_env=task.get_template_env())
    check_launch_request(rendered)
