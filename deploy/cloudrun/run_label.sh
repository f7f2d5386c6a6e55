#!/usr/bin/env bash
# Run `titans label --state` once, as an execution of the Cloud Run job create_job.sh made:
# label INPUT into OUTPUT with a student that keeps learning in STATE across runs.
#
#   PROJECT=my-project BUCKET=my-bucket IMAGE=... STATE=gs://my-bucket/state/titans \
#   INPUT=gs://my-bucket/events/dt=2026-11-28/ OUTPUT=gs://my-bucket/labels/dt=2026-11-28 \
#   TEACHER=gs://my-bucket/models/teacher.pt deploy/cloudrun/run_label.sh
#
# The arguments are the ones the Airflow DAG passes (deploy/airflow/titans_daily.py
# label_args; tests/test_deploy_schedule.py checks that both agree). The first run on an
# empty STATE is a plain `titans label`; later runs warm-start its student. The state's pool
# copies input rows (their model columns) into STATE.
set -euo pipefail

# --- settings (environment variables override the defaults) ------------------------------
PROJECT="${PROJECT:?set PROJECT to your Google Cloud project id}"
REGION="${REGION:-us-central1}"                     # Cloud Run and Dataflow region
BUCKET="${BUCKET:?set BUCKET to the bucket (no gs://) used for staging and temp files}"
IMAGE="${IMAGE:?set IMAGE to the image deploy/dataflow/build.sh printed}"
STATE="${STATE:?set STATE to the state directory, e.g. gs://BUCKET/state/titans}"
INPUT="${INPUT:?set INPUT, e.g. gs://BUCKET/events/dt=2026-11-28/}"
OUTPUT="${OUTPUT:?set OUTPUT, e.g. gs://BUCKET/labels/dt=2026-11-28}"
TEACHER="${TEACHER:?set TEACHER to the teacher model (gs://...)}"
FEATURE_COLUMNS="${FEATURE_COLUMNS:-features}"      # titans label --feature-columns
MAX_DISAGREEMENT="${MAX_DISAGREEMENT:-0.01}"        # the guarantee, re-certified every run
TEACHER_ACCELERATOR="${TEACHER_ACCELERATOR:-type:nvidia-l4;count:1;machine_type:g2-standard-4;install-nvidia-driver}"
WORKER_MACHINE_TYPE="${WORKER_MACHINE_TYPE:-n2-standard-4}"  # CPU workers of the Beam jobs
DISK_SIZE_GB="${DISK_SIZE_GB:-50}"                  # worker boot disk: holds the image
JOB="${JOB:-titans-label}"                          # the Cloud Run job (create_job.sh)
# -----------------------------------------------------------------------------------------

# gcloud's list syntax with '~' as the separator ('^~^'), so values may contain commas
ARGS="^~^label~--input~${INPUT}~--output~${OUTPUT}~--teacher~${TEACHER}"
ARGS+="~--feature-columns~${FEATURE_COLUMNS}~--max-disagreement~${MAX_DISAGREEMENT}"
ARGS+="~--state~${STATE}~--resume"                  # a rerun continues a stopped run
ARGS+="~--teacher-accelerator~${TEACHER_ACCELERATOR}~--teacher-device~cuda"
ARGS+="~--runner~DataflowRunner~--project~${PROJECT}~--region~${REGION}"
ARGS+="~--temp_location~gs://${BUCKET}/tmp~--staging_location~gs://${BUCKET}/staging"
ARGS+="~--sdk_container_image~${IMAGE}~--machine_type~${WORKER_MACHINE_TYPE}"
ARGS+="~--disk_size_gb~${DISK_SIZE_GB}"

# --wait: the execution's exit code is titans label's
gcloud run jobs execute "$JOB" \
  --project "$PROJECT" \
  --region "$REGION" \
  --args "$ARGS" \
  --wait

echo "done: gcloud storage cat ${OUTPUT%/}/report.json; the state's history: titans state $STATE"
