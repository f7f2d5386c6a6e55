"""The DAG in a real Airflow: it parses with no import errors under
[operators] default_deferrable = True, its operator waits synchronously with a fixed job name
per partition, the rendered body is what launch_body gives for that day, and with
TITANS_STATE it runs `titans label --state` as a Cloud Run job instead.

Airflow is not a titans dependency (hundreds of packages): these tests skip without it. Run
them in a separate environment (deploy/README.md, "What is checked offline"):

    python -m venv /tmp/airflowenv
    /tmp/airflowenv/bin/pip install apache-airflow apache-airflow-providers-google \
        apache-airflow-providers-apache-beam pytest
    /tmp/airflowenv/bin/python -m pytest --noconftest -q tests/test_deploy_airflow.py

(--noconftest: the suite's conftest imports titans, which that environment does not have.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("airflow.providers.google.cloud.operators.dataflow",
                    reason="Airflow with its Google provider not installed")

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "deploy" / "airflow"

PROBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}}
dag = bag.dags.get("titans_daily")
if dag is not None:
    (task,) = dag.tasks
    out["operator"] = type(task).__name__
    out["deferrable"] = getattr(task, "deferrable", None)
    if out["operator"] == "DataflowStartFlexTemplateOperator":
        out["wait_until_finished"] = task.wait_until_finished
        out["append_job_name"] = task.append_job_name
        out["body"] = task.render_template(task.body, {"ds": "2026-11-28"},
                                           jinja_env=task.get_template_env())
    else:
        out["job_name"] = task.job_name
        out["overrides"] = task.render_template(task.overrides, {"ds": "2026-11-28"},
                                                jinja_env=task.get_template_env())
print("PROBE" + json.dumps(out))
"""


def probe(tmp_path: Path, **env) -> dict:
    """Parse the DAG folder in a fresh interpreter (Airflow reads its config at import)."""
    environ = dict(os.environ, AIRFLOW_HOME=str(tmp_path / "airflow"),
                   AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE="True",
                   AIRFLOW__CORE__LOAD_EXAMPLES="False", **env)
    done = subprocess.run([sys.executable, "-c", PROBE, str(DAGS)], capture_output=True,
                          text=True, timeout=300, env=environ)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [s for s in done.stdout.splitlines() if s.startswith("PROBE")][-1]
    return json.loads(line[len("PROBE"):])


def load_dag_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("titans_daily_plain", DAGS / "titans_daily.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dag_parses_with_default_deferrable_and_waits_for_one_job_per_day(tmp_path):
    out = probe(tmp_path)
    assert out["errors"] == {}
    assert out["operator"] == "DataflowStartFlexTemplateOperator"
    assert out["deferrable"] is False and out["wait_until_finished"] is True
    assert out["append_job_name"] is False
    body = out["body"]
    assert body["launchParameter"]["jobName"] == "titans-daily-2026-11-28"
    assert body == json.loads(json.dumps(load_dag_module().launch_body("2026-11-28")))
    from google.cloud.dataflow_v1beta3.types import templates
    from google.protobuf import json_format

    json_format.ParseDict(body, templates.LaunchFlexTemplateRequest.pb()(),
                          ignore_unknown_fields=False)
    assert body["launchParameter"]["environment"]["launcherMachineType"]


def test_with_a_state_the_dag_runs_titans_label_as_a_cloud_run_job(tmp_path):
    out = probe(tmp_path, TITANS_STATE="gs://bkt/state/titans", TITANS_BUCKET="bkt")
    assert out["errors"] == {}
    assert out["operator"] == "CloudRunExecuteJobOperator"
    assert out["deferrable"] is False and out["job_name"] == "titans-label"
    args = out["overrides"]["container_overrides"][0]["args"]
    assert args[0] == "label"
    assert args[args.index("--state") + 1] == "gs://bkt/state/titans"
    assert args[args.index("--input") + 1] == "gs://bkt/events/dt=2026-11-28/"


def test_a_missing_provider_is_an_import_error_naming_what_to_install(tmp_path):
    """The DAG file with its Dataflow operator module unreachable (as on an Airflow without
    the providers): Airflow lists an import error with the packages to install, instead of a
    folder that silently has no titans_daily DAG."""
    dags = tmp_path / "dags"
    dags.mkdir()
    text = (DAGS / "titans_daily.py").read_text()
    assert "operators.dataflow import (" in text
    (dags / "titans_daily.py").write_text(
        text.replace("operators.dataflow import (", "operators.dataflow_not_installed import ("))
    environ = dict(os.environ, AIRFLOW_HOME=str(tmp_path / "airflow"))
    done = subprocess.run([sys.executable, "-c", PROBE, str(dags)], capture_output=True,
                          text=True, timeout=300, env=environ)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads([s for s in done.stdout.splitlines() if s.startswith("PROBE")][-1][5:])
    (error,) = out["errors"].values()
    assert "pip install apache-airflow-providers-google apache-airflow-providers-apache-beam" \
        in error
    assert "operator" not in out  # no DAG
