#!/usr/bin/env bash
# Run the titans Flex Template once: label INPUT into OUTPUT, the teacher on GPU workers only.
#
#   PROJECT=my-project BUCKET=my-bucket IMAGE=... TEMPLATE=gs://.../titans-TAG.json \
#   INPUT=gs://my-bucket/events/dt=2026-11-28/ OUTPUT=gs://my-bucket/labels/dt=2026-11-28 \
#   STUDENT=gs://my-bucket/models/student.pt TEACHER=gs://my-bucket/models/teacher.pt \
#   deploy/dataflow/run.sh
#
# GPU: only the teacher's RunInference step carries the accelerator resource hint
# (titans --teacher-accelerator), so with Dataflow's right fitting the student, the reads,
# the split and the writers run on CPU workers (WORKER_MACHINE_TYPE) and only the teacher
# step gets workers with a GPU (the hint's machine_type). Right fitting is on as soon as a
# step has a resource hint; it is batch-only, not with FlexRS, and must NOT be combined with
# --dataflow_service_options=worker_accelerator=... (which would put a GPU on every worker).
set -euo pipefail

# --- settings (environment variables override the defaults) ------------------------------
PROJECT="${PROJECT:?set PROJECT to your Google Cloud project id}"
REGION="${REGION:-us-central1}"                     # must offer the GPU type below
BUCKET="${BUCKET:?set BUCKET to the bucket (no gs://) used for staging and temp files}"
IMAGE="${IMAGE:?set IMAGE to the image deploy/dataflow/build.sh printed}"
TEMPLATE="${TEMPLATE:?set TEMPLATE to the template spec deploy/dataflow/build.sh printed}"
INPUT="${INPUT:?set INPUT, e.g. gs://BUCKET/events/dt=2026-11-28/}"
OUTPUT="${OUTPUT:?set OUTPUT, e.g. gs://BUCKET/labels/dt=2026-11-28}"
STUDENT="${STUDENT:?set STUDENT to the student model (gs://...)}"
TEACHER="${TEACHER:?set TEACHER to the teacher model (gs://...)}"
FEATURE_COLUMNS="${FEATURE_COLUMNS:-features}"      # titans run --feature-columns
DEFERRAL_RATE="${DEFERRAL_RATE:-0.2}"               # share of rows sent to the teacher
# accelerator hint of the teacher step: GPU type and count, the GPU VM type, the driver
TEACHER_ACCELERATOR="${TEACHER_ACCELERATOR:-type:nvidia-l4;count:1;machine_type:g2-standard-4;install-nvidia-driver}"
TEACHER_BATCH_SIZE="${TEACHER_BATCH_SIZE:-16384}"   # rows per teacher forward pass
WORKER_MACHINE_TYPE="${WORKER_MACHINE_TYPE:-n2-standard-4}"  # CPU workers (all other steps)
# the launcher VM imports torch, loads both models and samples rows before it submits the
# job: Dataflow's default launcher (n1-standard-1, 3.75 GB) is too small for that
LAUNCHER_MACHINE_TYPE="${LAUNCHER_MACHINE_TYPE:-n2-standard-4}"
DISK_SIZE_GB="${DISK_SIZE_GB:-50}"                  # worker boot disk: holds the multi-GB image
MAX_WORKERS="${MAX_WORKERS:-20}"
# lowercase letters, digits, '-'; Dataflow refuses a second active job of the same name, so
# a name per partition (e.g. titans-20261128) keeps one job per output
JOB_NAME="${JOB_NAME:-titans-$(date -u +%Y%m%d-%H%M%S)}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-}"              # worker service account; empty = default
# -----------------------------------------------------------------------------------------

# --parameters takes KEY=VALUE pairs separated by commas; the accelerator hint contains ';'
# and ':' but no ',', so the default delimiter works. Values with commas (several
# FEATURE_COLUMNS) need gcloud's alternative delimiter: '^~^k1=v1~k2=v2'.
PARAMS="^~^input=${INPUT}~output=${OUTPUT}~student=${STUDENT}~teacher=${TEACHER}"
PARAMS+="~feature_columns=${FEATURE_COLUMNS}~deferral_rate=${DEFERRAL_RATE}"
PARAMS+="~teacher_accelerator=${TEACHER_ACCELERATOR}~teacher_batch_size=${TEACHER_BATCH_SIZE}"
# fail on a teacher worker without a GPU instead of silently labeling on its CPU
PARAMS+="~teacher_device=cuda"
# the image the workers run: the same one the launcher ran (Beam option, not a titans flag)
PARAMS+="~sdk_container_image=${IMAGE}"
# worker disk: a Beam option too (gcloud's flex-template run has no disk flag)
PARAMS+="~disk_size_gb=${DISK_SIZE_GB}"

EXTRA=()
if [[ -n "$SERVICE_ACCOUNT" ]]; then
  EXTRA+=(--service-account-email "$SERVICE_ACCOUNT")
fi

gcloud dataflow flex-template run "$JOB_NAME" \
  --project "$PROJECT" \
  --region "$REGION" \
  --template-file-gcs-location "$TEMPLATE" \
  --staging-location "gs://${BUCKET}/staging" \
  --temp-location "gs://${BUCKET}/tmp" \
  --worker-machine-type "$WORKER_MACHINE_TYPE" \
  --launcher-machine-type "$LAUNCHER_MACHINE_TYPE" \
  --max-workers "$MAX_WORKERS" \
  --parameters "$PARAMS" \
  ${EXTRA[@]+"${EXTRA[@]}"}

echo "job $JOB_NAME launched: gcloud dataflow jobs list --project $PROJECT --region $REGION --filter name=$JOB_NAME"
echo "when it is done: gcloud storage cat ${OUTPUT%/}/report.json"
