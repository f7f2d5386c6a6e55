#!/usr/bin/env bash
# Create the Cloud Run job that runs `titans label` from the titans image: the route for
# `titans label --state gs://...`, a student that keeps learning across scheduled runs.
#
#   PROJECT=my-project REGION=us-central1 IMAGE=... deploy/cloudrun/create_job.sh
#
# Why not the Flex Template: `titans label` runs several phases and waits between them (a
# teacher job on the sample, distillation on this machine, calibration, the cascade job),
# while a Flex Template launcher may hand Dataflow one job graph and must not wait. The Cloud
# Run job runs the same image with `titans` as its command; the Beam jobs it starts still run
# on Dataflow (--runner DataflowRunner), the teacher on GPU workers. Each execution gets its
# arguments from deploy/cloudrun/run_label.sh or the Airflow DAG (TITANS_STATE set).
set -euo pipefail

# --- settings (environment variables override the defaults) ------------------------------
PROJECT="${PROJECT:?set PROJECT to your Google Cloud project id}"
REGION="${REGION:-us-central1}"                     # Cloud Run region (and Dataflow's)
IMAGE="${IMAGE:?set IMAGE to the image deploy/dataflow/build.sh printed}"
JOB="${JOB:-titans-label}"                          # Cloud Run job name
CPU="${CPU:-8}"                                     # the student is distilled here, on CPU
MEMORY="${MEMORY:-32Gi}"                            # sample, pool and models in memory
TASK_TIMEOUT="${TASK_TIMEOUT:-24h}"                 # one run: its Dataflow jobs included
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-}"              # runs the jobs; empty = default
# -----------------------------------------------------------------------------------------

EXTRA=()
if [[ -n "$SERVICE_ACCOUNT" ]]; then
  EXTRA+=(--service-account "$SERVICE_ACCOUNT")
fi

# --max-retries 0: a failed run is retried by its scheduler with --resume, which reuses the
# phases that completed instead of paying the teacher for them again
gcloud run jobs create "$JOB" \
  --project "$PROJECT" \
  --region "$REGION" \
  --image "$IMAGE" \
  --command titans \
  --cpu "$CPU" \
  --memory "$MEMORY" \
  --task-timeout "$TASK_TIMEOUT" \
  --max-retries 0 \
  ${EXTRA[@]+"${EXTRA[@]}"}

echo "created Cloud Run job $JOB; label a partition with deploy/cloudrun/run_label.sh"
