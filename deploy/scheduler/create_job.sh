#!/usr/bin/env bash
# Cloud Scheduler alternative to the Airflow DAG: POST launch_body.json to the Dataflow
# projects.locations.flexTemplates.launch API on a cron schedule.
#
#   PROJECT=my-project BUCKET=my-bucket IMAGE=... TEMPLATE=gs://.../titans-TAG.json \
#   SCHEDULER_SA=titans-scheduler@my-project.iam.gserviceaccount.com \
#   deploy/scheduler/create_job.sh
#
# Cloud Scheduler sends the same body every time: it cannot put the date into the paths.
# launch_body.json therefore labels a fixed input prefix (gs://BUCKET/events/current/) into a
# fixed output (gs://BUCKET/labels/current, replaced each run: overwrite=true). With
# skip_labeled (gs://BUCKET/labels/_manifests/current.json), a run that finds no new or
# changed file since the last completed one starts no labeling (a one-step job that logs
# it); otherwise the prefix is labeled again as a whole, since overwrite replaces its labels.
# For date-partitioned input (dt=YYYY-MM-DD) use the Airflow DAG (deploy/airflow/titans_daily.py).
#
# SCHEDULER_SA needs roles/dataflow.developer on the project and roles/iam.serviceAccountUser
# on the workers' service account; Cloud Scheduler gets an OAuth token for it.
set -euo pipefail

# --- settings (environment variables override the defaults) ------------------------------
PROJECT="${PROJECT:?set PROJECT to your Google Cloud project id}"
REGION="${REGION:-us-central1}"                     # Dataflow region (and Scheduler location)
BUCKET="${BUCKET:?set BUCKET to the bucket (no gs://) of the data, models and staging}"
IMAGE="${IMAGE:?set IMAGE to the image deploy/dataflow/build.sh printed}"
TEMPLATE="${TEMPLATE:?set TEMPLATE to the template spec deploy/dataflow/build.sh printed}"
SCHEDULER_SA="${SCHEDULER_SA:?set SCHEDULER_SA to the service account Scheduler calls Dataflow as}"
JOB="${JOB:-titans-daily}"                          # Cloud Scheduler job name
SCHEDULE="${SCHEDULE:-0 2 * * *}"                   # cron: every day at 02:00
TIME_ZONE="${TIME_ZONE:-Etc/UTC}"
# -----------------------------------------------------------------------------------------

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BODY="$(mktemp)"
trap 'rm -f "$BODY"' EXIT
# fill ${PROJECT} ${BUCKET} ${IMAGE} ${TEMPLATE} in the body (no envsubst needed)
sed -e "s|\${PROJECT}|${PROJECT}|g" -e "s|\${BUCKET}|${BUCKET}|g" \
    -e "s|\${IMAGE}|${IMAGE}|g" -e "s|\${TEMPLATE}|${TEMPLATE}|g" \
    "$HERE/launch_body.json" >"$BODY"
if grep -q '[$]{' "$BODY"; then
  echo "unfilled placeholder in $BODY:" >&2
  grep -n '[$]{' "$BODY" >&2
  exit 2
fi

gcloud scheduler jobs create http "$JOB" \
  --project "$PROJECT" \
  --location "$REGION" \
  --schedule "$SCHEDULE" \
  --time-zone "$TIME_ZONE" \
  --uri "https://dataflow.googleapis.com/v1b3/projects/${PROJECT}/locations/${REGION}/flexTemplates:launch" \
  --http-method POST \
  --headers "Content-Type=application/json" \
  --message-body-from-file "$BODY" \
  --oauth-service-account-email "$SCHEDULER_SA" \
  --oauth-token-scope "https://www.googleapis.com/auth/cloud-platform" \
  --attempt-deadline 180s

echo "created Cloud Scheduler job $JOB ($SCHEDULE $TIME_ZONE); run it now with:"
echo "  gcloud scheduler jobs run $JOB --project $PROJECT --location $REGION"
