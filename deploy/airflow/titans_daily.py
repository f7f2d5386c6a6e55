"""Airflow DAG: label each day's partition with titans on Dataflow.

    gs://BUCKET/events/dt=YYYY-MM-DD/*.parquet  ->  gs://BUCKET/labels/dt=YYYY-MM-DD/

Copy this file into the DAGs folder (Cloud Composer: `gcloud composer environments storage
dags import --environment ENV --location REGION --source deploy/airflow/titans_daily.py`)
and set the TITANS_* environment variables of the Airflow workers, or edit the defaults
below. Needs apache-airflow-providers-google and apache-airflow-providers-apache-beam (the
Dataflow operators module imports the Beam provider); without them this file fails to
import with a message saying what to install, so the DAG shows up as an import error
instead of vanishing.

Two ways to label a day, one per DAG run:
  * `titans run` (default): the Flex Template, with a fixed student (TITANS_STUDENT).
    One Dataflow job per day, named `titans-daily-YYYY-MM-DD`: no suffix is appended, so
    while a day's job runs Dataflow refuses a second job of that name (a retry after a
    lost Airflow worker fails instead of writing into the same output), and titans' output
    lock refuses a second writer of the output.
  * `titans label --state gs://...` (TITANS_STATE set): a student that keeps learning
    across days. `titans label` runs several phases and waits between them (a teacher job on
    the sample, distillation, the cascade job), which a Flex Template launcher cannot do, so
    it runs as a Cloud Run job from the same image (`titans label ... --runner
    DataflowRunner`; the Beam jobs still run on Dataflow) that this DAG executes with the
    day's arguments. The state's own lock keeps one writer.

The run for the interval [D 02:00, D+1 02:00) UTC starts at D+1 02:00 and labels partition
dt=D ({{ ds }} is the interval start on Airflow 2 and 3 because the timetable is an interval
timetable, not Airflow 3's default trigger timetable).

`launch_body()`, `flex_template_kwargs()`, `label_args()` and `label_job_kwargs()` are plain
Python and import nothing from Airflow, so what the DAG hands its operators is checked
without Airflow (tests/test_deploy_schedule.py).
"""
from __future__ import annotations

import importlib.util
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
# The launcher VM imports torch, loads both models and samples rows before it submits the
# job: Dataflow's default launcher (n1-standard-1, 3.75 GB) is too small for that.
LAUNCHER_MACHINE_TYPE = os.environ.get("TITANS_LAUNCHER_MACHINE_TYPE", "n2-standard-4")
# Workers pull the multi-GB image (torch with its CUDA libraries): more than a batch job's
# default boot disk when Dataflow Shuffle is on (25 GB).
DISK_SIZE_GB = int(os.environ.get("TITANS_DISK_SIZE_GB", "50"))
# `titans label --state`: empty = the `titans run` route above
STATE = os.environ.get("TITANS_STATE", "")  # e.g. gs://BUCKET/state/titans
LABEL_JOB = os.environ.get("TITANS_LABEL_JOB", "titans-label")  # the Cloud Run job's name


def job_name(ds: str) -> str:
    """One Dataflow job name per partition, the same on every try and backfill of that day."""
    return f"titans-daily-{ds}"


def launch_body(ds: str, *, bucket: str = BUCKET, template: str = TEMPLATE, image: str = IMAGE,
                student: str = STUDENT, teacher: str = TEACHER,
                teacher_accelerator: str = TEACHER_ACCELERATOR, feature_columns: str = "features",
                deferral_rate: str = "0.2", worker_machine_type: str = "n2-standard-4",
                launcher_machine_type: str = LAUNCHER_MACHINE_TYPE,
                disk_size_gb: int = DISK_SIZE_GB, max_workers: int = 20,
                extra_parameters: dict | None = None) -> dict:
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
        # a retried or backfilled day replaces its own previous outputs; the job does it at
        # its end, so the old labels stay readable until the new ones are complete
        "overwrite": "true",
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
            "jobName": job_name(ds),
            "containerSpecGcsPath": template,
            "parameters": parameters,
            "environment": {
                "tempLocation": f"gs://{bucket}/tmp",
                "stagingLocation": f"gs://{bucket}/staging",
                "machineType": worker_machine_type,  # CPU workers: every step but the teacher
                "launcherMachineType": launcher_machine_type,
                "diskSizeGb": disk_size_gb,
                "maxWorkers": max_workers,
            },
        }
    }


def flex_template_kwargs(ds: str = "{{ ds }}") -> dict:
    """DataflowStartFlexTemplateOperator's arguments (body is a templated field)."""
    return dict(
        task_id="label_partition",
        project_id=PROJECT,
        location=REGION,
        body=launch_body(ds),
        wait_until_finished=True,  # the task succeeds when the job does, fails when it fails
        # explicit: an Airflow with [operators] default_deferrable = True would otherwise
        # turn this into a deferrable task, which rejects wait_until_finished
        deferrable=False,
        # the job name stays job_name(ds): Dataflow refuses a second active job of that
        # name, so a retry cannot run beside a job that is still writing the same output
        append_job_name=False,
    )


def label_args(ds: str, *, state: str = STATE, bucket: str = BUCKET, teacher: str = TEACHER,
               image: str = IMAGE, teacher_accelerator: str = TEACHER_ACCELERATOR,
               feature_columns: str = "features", max_disagreement: str = "0.01",
               worker_machine_type: str = "n2-standard-4", disk_size_gb: int = DISK_SIZE_GB,
               project: str = PROJECT, region: str = REGION) -> list[str]:
    """`titans label` arguments for the partition ``ds`` with the learning state ``state``:
    titans flags, then the Beam options of the jobs it submits to Dataflow."""
    if not state:
        raise ValueError("label_args needs a state directory (TITANS_STATE=gs://BUCKET/state/...)")
    return [
        "label",
        "--input", f"gs://{bucket}/events/dt={ds}/",
        "--output", f"gs://{bucket}/labels/dt={ds}",
        "--teacher", teacher,
        "--feature-columns", feature_columns,
        "--max-disagreement", str(max_disagreement),
        # the student learns across days: warm start, a pool of teacher-labelled rows,
        # calibration on each day's own rows (the pool copies input rows into the state)
        "--state", state,
        # a retry of a day continues where the killed run stopped
        "--resume",
        "--teacher-accelerator", teacher_accelerator,
        "--teacher-device", "cuda",
        "--runner", "DataflowRunner", "--project", project, "--region", region,
        "--temp_location", f"gs://{bucket}/tmp", "--staging_location", f"gs://{bucket}/staging",
        "--sdk_container_image", image, "--machine_type", worker_machine_type,
        "--disk_size_gb", str(disk_size_gb),
    ]


def label_job_kwargs(ds: str = "{{ ds }}", state: str = STATE) -> dict:
    """CloudRunExecuteJobOperator's arguments: the Cloud Run job LABEL_JOB (the titans
    image with `titans` as its command, see deploy/README.md) run with the day's args."""
    return dict(
        task_id="label_partition_with_state",
        project_id=PROJECT,
        region=REGION,
        job_name=LABEL_JOB,
        overrides={"container_overrides": [{"args": label_args(ds, state=state)}]},
        deferrable=False,  # waits for the execution; its exit code is the task's result
    )


def _operators():
    """The Airflow classes this DAG needs; a missing provider fails the import loudly."""
    try:
        from airflow.providers.google.cloud.operators.cloud_run import CloudRunExecuteJobOperator
        from airflow.providers.google.cloud.operators.dataflow import (
            DataflowStartFlexTemplateOperator)
    except ImportError as e:
        raise ImportError(
            "titans_daily needs Airflow's Google and Apache Beam providers: pip install "
            "apache-airflow-providers-google apache-airflow-providers-apache-beam (Cloud "
            f"Composer: add both as PyPI packages of the environment); import failed: {e}"
        ) from e
    return DataflowStartFlexTemplateOperator, CloudRunExecuteJobOperator


# The DAG itself only where Airflow runs this file; without Airflow (tests, tools) the
# functions above are all there is.
if importlib.util.find_spec("airflow") is not None:
    import pendulum
    from airflow.timetables.interval import CronDataIntervalTimetable

    try:
        from airflow.sdk import DAG  # Airflow 3
    except ImportError:  # Airflow 2
        from airflow import DAG

    FlexTemplate, CloudRunJob = _operators()
    with DAG(
        dag_id="titans_daily",
        description="Label yesterday's events partition with the titans cascade on Dataflow",
        schedule=CronDataIntervalTimetable("0 2 * * *", timezone="UTC"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,  # one day at a time: the manifest and the state have one writer
        default_args={"retries": 1, "retry_delay": pendulum.duration(minutes=10)},
        tags=["titans", "dataflow"],
    ) as dag:
        if STATE:
            CloudRunJob(**label_job_kwargs())
        else:
            FlexTemplate(**flex_template_kwargs())
else:
    DAG = None
