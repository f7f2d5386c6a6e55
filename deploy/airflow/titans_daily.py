"""Airflow DAG: label each day's partition with the titans Flex Template on Dataflow.

    gs://BUCKET/events/dt=YYYY-MM-DD/*.parquet  ->  gs://BUCKET/labels/dt=YYYY-MM-DD/

Copy this file into the DAGs folder (Cloud Composer: `gcloud composer environments storage
dags import --environment ENV --location REGION --source deploy/airflow/titans_daily.py`)
and set the TITANS_* environment variables of the Airflow workers, or edit the defaults
below. Needs apache-airflow-providers-google and apache-airflow-providers-apache-beam (the
Dataflow operators module imports the Beam provider).

The run for the interval [D 02:00, D+1 02:00) UTC starts at D+1 02:00 and labels partition
dt=D ({{ ds }} is the interval start on Airflow 2 and 3 because the timetable is an interval
timetable, not Airflow 3's default trigger timetable). overwrite=true makes a retry or a
backfill of the same day replace that day's previous outputs instead of failing, and
skip_labeled (a manifest per day) makes a rerun of a day that completed, with no new or
changed files, start no labeling at all.

`launch_body()` is plain Python and imports nothing from Airflow, so the request it builds can
be checked without Airflow (tests/test_deploy_schedule.py checks it against metadata.json).
"""
from __future__ import annotations

import os

PROJECT = os.environ.get("TITANS_PROJECT", "PROJECT")
REGION = os.environ.get("TITANS_REGION", "us-central1")
BUCKET = os.environ.get("TITANS_BUCKET", "BUCKET")  # no gs://
IMAGE = os.environ.get("TITANS_IMAGE", "REGION-docker.pkg.dev/PROJECT/titans/titans:TAG")
TEMPLATE = os.environ.get("TITANS_TEMPLATE", "gs://BUCKET/templates/titans-TAG.json")
STUDENT = os.environ.get("TITANS_STUDENT", "gs://BUCKET/models/student.pt")
TEACHER = os.environ.get("TITANS_TEACHER", "gs://BUCKET/models/teacher.pt")
TEACHER_ACCELERATOR = os.environ.get(
    "TITANS_TEACHER_ACCELERATOR",
    "type:nvidia-l4;count:1;machine_type:g2-standard-4;install-nvidia-driver")


def launch_body(ds: str, *, bucket: str = BUCKET, template: str = TEMPLATE, image: str = IMAGE,
                student: str = STUDENT, teacher: str = TEACHER,
                teacher_accelerator: str = TEACHER_ACCELERATOR, feature_columns: str = "features",
                deferral_rate: str = "0.2", worker_machine_type: str = "n2-standard-4",
                max_workers: int = 20, extra_parameters: dict | None = None) -> dict:
    """The projects.locations.flexTemplates:launch request body for the partition ``ds``
    (YYYY-MM-DD, or the Jinja string "{{ ds }}" that Airflow renders at run time).

    Parameters are `titans run` flags (metadata.json) plus the Beam option
    sdk_container_image; everything about machines goes in ``environment``."""
    parameters = {
        "input": f"gs://{bucket}/events/dt={ds}/",
        "output": f"gs://{bucket}/labels/dt={ds}",
        "student": student,
        "teacher": teacher,
        "feature_columns": feature_columns,
        "deferral_rate": str(deferral_rate),
        "overwrite": "true",  # a retried or backfilled day replaces its own previous outputs
        # a rerun or backfill of a day that completed starts no labeling (a one-step job
        # that logs "already labeled"); a day with late files is labeled again as a whole,
        # since overwrite replaces its labels (pipeline/manifest.py). One manifest per day
        # keeps it small; max_active_runs=1 keeps its updates apart
        "skip_labeled": f"gs://{bucket}/labels/_manifests/dt={ds}.json",
        # only the teacher step asks for a GPU (right fitting); fail rather than label on CPU
        "teacher_accelerator": teacher_accelerator,
        "teacher_device": "cuda",
        # workers run the image the launcher ran
        "sdk_container_image": image,
    }
    parameters.update(extra_parameters or {})
    return {
        "launchParameter": {
            "jobName": f"titans-daily-{ds}",
            "containerSpecGcsPath": template,
            "parameters": parameters,
            "environment": {
                "tempLocation": f"gs://{bucket}/tmp",
                "stagingLocation": f"gs://{bucket}/staging",
                "machineType": worker_machine_type,  # CPU workers: every step but the teacher
                "maxWorkers": max_workers,
            },
        }
    }


try:  # the DAG itself only where Airflow is installed
    import pendulum
    from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator
    from airflow.timetables.interval import CronDataIntervalTimetable

    try:
        from airflow.sdk import DAG  # Airflow 3
    except ImportError:  # Airflow 2
        from airflow import DAG
except ImportError:
    DAG = None

if DAG is not None:
    with DAG(
        dag_id="titans_daily",
        description="Label yesterday's events partition with the titans cascade on Dataflow",
        schedule=CronDataIntervalTimetable("0 2 * * *", timezone="UTC"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args={"retries": 1, "retry_delay": pendulum.duration(minutes=10)},
        tags=["titans", "dataflow"],
    ) as dag:
        DataflowStartFlexTemplateOperator(
            task_id="label_partition",
            project_id=PROJECT,
            location=REGION,
            body=launch_body("{{ ds }}"),  # rendered per run: body is a templated field
            wait_until_finished=True,  # the task succeeds when the job does
            # or deferrable=True (and no wait_until_finished) to wait in the triggerer
            # without holding a worker slot; both at once raise ValueError
            append_job_name=True,  # unique job names for retries
        )
