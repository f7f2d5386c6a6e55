#!/usr/bin/env bash
# Build (and push) the titans worker/launcher image, then the Flex Template spec that points
# to it. Run from anywhere; it works from the repository root.
#
#   PROJECT=my-project REGION=us-central1 BUCKET=my-bucket deploy/dataflow/build.sh
#
# Needs gcloud (authenticated) and, with BUILDER=docker, a local Docker engine. Nothing
# else from this repository is installed locally: the image builds titans itself.
set -euo pipefail

# --- settings (environment variables override the defaults) ------------------------------
PROJECT="${PROJECT:?set PROJECT to your Google Cloud project id}"
REGION="${REGION:-us-central1}"                     # Dataflow and Artifact Registry region
BUCKET="${BUCKET:?set BUCKET to a Cloud Storage bucket (no gs://) for templates and staging}"
REPOSITORY="${REPOSITORY:-titans}"                  # Artifact Registry Docker repository
TAG="${TAG:-$(date -u +%Y%m%d-%H%M%S)}"             # a new tag per build; never reuse :latest
IMAGE="${IMAGE:-${REGION}-docker.pkg.dev/${PROJECT}/${REPOSITORY}/titans:${TAG}}"
TEMPLATE="${TEMPLATE:-gs://${BUCKET}/templates/titans-${TAG}.json}"  # the template spec file
BUILDER="${BUILDER:-cloudbuild}"                    # cloudbuild | docker | none (image exists)
# -----------------------------------------------------------------------------------------

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

# 1. the image (deploy/Dockerfile, build context = repository root), then its size unpacked
#    (in the Cloud Build log, or here): the launcher and every worker pull it, and their
#    boot disks must hold it (diskSizeGb / disk_size_gb in run.sh and the schedules).
SIZE_COMMAND="docker image inspect --format 'image size: {{.Size}} bytes unpacked' '${IMAGE}'"
case "$BUILDER" in
  cloudbuild)
    # Cloud Build has no --file flag for --tag builds, so pass a one-step config inline.
    CONFIG="$(mktemp)"
    trap 'rm -f "$CONFIG"' EXIT
    cat >"$CONFIG" <<EOF
steps:
- name: gcr.io/cloud-builders/docker
  args: [build, -f, deploy/Dockerfile, -t, '${IMAGE}', .]
- name: gcr.io/cloud-builders/docker
  entrypoint: bash
  args: [-c, "${SIZE_COMMAND}"]
images: ['${IMAGE}']
timeout: 3600s
EOF
    gcloud builds submit . --project "$PROJECT" --region "$REGION" --config "$CONFIG" \
      --machine-type e2-highcpu-8
    ;;
  docker)
    docker build -f deploy/Dockerfile -t "$IMAGE" .
    bash -c "$SIZE_COMMAND"
    docker push "$IMAGE"
    ;;
  none) ;;
  *) echo "BUILDER must be cloudbuild, docker or none, not '$BUILDER'" >&2; exit 2 ;;
esac

# 2. the Flex Template spec: the image runs deploy/dataflow/launch.py on the launcher VM
#    (FLEX_TEMPLATE_PYTHON_PY_FILE in the image); metadata.json lists `titans run`'s flags.
gcloud dataflow flex-template build "$TEMPLATE" \
  --project "$PROJECT" \
  --image "$IMAGE" \
  --sdk-language PYTHON \
  --metadata-file deploy/dataflow/metadata.json \
  --staging-location "gs://${BUCKET}/staging" \
  --temp-location "gs://${BUCKET}/tmp"

echo "image:    $IMAGE"
echo "template: $TEMPLATE"
echo "next:     IMAGE=$IMAGE TEMPLATE=$TEMPLATE deploy/dataflow/run.sh"
