#!/usr/bin/env bash
# Set up tuneplane on Google Cloud with gcloud: what the original guide did by hand.
#
#   PROJECT_ID=my-project BUCKET=my-project-tuneplane HF_TOKEN=hf_... deploy/deploy.sh
#
# Creates (or brings up to date; every step can run again): the APIs, a bucket, an Artifact
# Registry repository, both images (built by Cloud Build), the secrets (HF token, callback
# signing key, database URL), two service accounts and their roles, a Cloud SQL for PostgreSQL
# instance, the trainer Job and the api as a Cloud Run service.
#
# The trainer Job is the one the api's CloudRunDispatcher builds from the same settings
# (api/dispatch/cloudrun_job.py; tests/cloud/test_cloud_deploy.py compares the two), so the api
# finds it up to date and leaves it alone. Jobs of other GPU types are created by the api itself
# the first time a run asks for one.
set -euo pipefail

: "${PROJECT_ID:?set PROJECT_ID to your Google Cloud project id}"
: "${BUCKET:?set BUCKET to a globally unique bucket name, e.g. ${PROJECT_ID}-tuneplane}"
REGION="${REGION:-us-central1}"
GPU_TYPE="${GPU_TYPE:-nvidia-l4}"                # or nvidia-rtx-pro-6000
REPO="${REPO:-tuneplane}"
JOB="${JOB:-tuneplane-trainer}"                  # the Job is "$JOB-l4" / "$JOB-rtx-pro-6000"
SERVICE="${SERVICE:-tuneplane-api}"
DB_INSTANCE="${DB_INSTANCE:-tuneplane-db}"
DB_TIER="${DB_TIER:-db-g1-small}"
HF_SECRET="${HF_SECRET:-hf-token}"
MAX_RETRIES="${MAX_RETRIES:-3}"                  # = TUNEPLANE_CLOUD_RUN_MAX_RETRIES
TIMEOUT_MARGIN_MINUTES="${TIMEOUT_MARGIN_MINUTES:-5}"  # = TUNEPLANE_CLOUD_RUN_TIMEOUT_MARGIN_MINUTES
LONG_GPU_TASKS="${LONG_GPU_TASKS:-false}"        # = TUNEPLANE_CLOUD_RUN_LONG_GPU_TASKS (preview)
IAM_WAIT_SECONDS="${IAM_WAIT_SECONDS:-420}"      # IAM changes take up to 7 minutes to apply
VPC_NETWORK="${VPC_NETWORK:-}"                   # optional Direct VPC egress of the trainer
VPC_SUBNET="${VPC_SUBNET:-}"
VPC_EGRESS="${VPC_EGRESS:-private-ranges-only}"
TAG="${TAG:-$(date +%Y%m%d-%H%M%S)}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

case "$GPU_TYPE" in
  nvidia-l4) GPU_SUFFIX=l4 CPU=4 MEMORY=16Gi ;;               # Cloud Run's minimum for one L4
  nvidia-rtx-pro-6000) GPU_SUFFIX=rtx-pro-6000 CPU=20 MEMORY=80Gi ;;
  *) echo "GPU_TYPE must be nvidia-l4 or nvidia-rtx-pro-6000" >&2; exit 2 ;;
esac

REGISTRY="${REGION}-docker.pkg.dev/${PROJECT_ID}/${REPO}"
TRAINER_IMAGE="${TRAINER_IMAGE:-${REGISTRY}/trainer:${TAG}}"
API_IMAGE="${API_IMAGE:-${REGISTRY}/api:${TAG}}"
TRAINER_SA="tuneplane-trainer@${PROJECT_ID}.iam.gserviceaccount.com"
API_SA="tuneplane-api@${PROJECT_ID}.iam.gserviceaccount.com"
# The default time budget (55 min) plus the margin, within the cap: GPU tasks may run 1 hour, or
# 12 hours with the preview "long running GPU jobs"
# (https://cloud.google.com/run/docs/configuring/task-timeout). Same rule as
# api/dispatch/cloudrun_job.py's task_timeout_seconds.
CAP_SECONDS=3600
[[ "$LONG_GPU_TASKS" == true ]] && CAP_SECONDS=43200
TASK_TIMEOUT_SECONDS=$(( (55 + TIMEOUT_MARGIN_MINUTES) * 60 ))
(( TASK_TIMEOUT_SECONDS <= CAP_SECONDS )) || TASK_TIMEOUT_SECONDS=$CAP_SECONDS
# Preview features (the RTX PRO 6000 GPU, GPU tasks over an hour) need the Job at launch stage
# BETA, which the `gcloud beta` track sets; the GA track would have Cloud Run refuse the Job.
RUN_TRACK=(run)
if [[ "$GPU_TYPE" == nvidia-rtx-pro-6000 || "$LONG_GPU_TASKS" == true ]]; then
  RUN_TRACK=(beta run)
fi

g() { gcloud --project="$PROJECT_ID" --quiet "$@"; }
exists() { g "$@" >/dev/null 2>&1; }
say() { printf '\n==> %s\n' "$*"; }
random_hex() { python3 -c 'import secrets; print(secrets.token_hex(32))'; }

say "APIs"
g services enable run.googleapis.com artifactregistry.googleapis.com cloudbuild.googleapis.com \
  secretmanager.googleapis.com sqladmin.googleapis.com iam.googleapis.com \
  iamcredentials.googleapis.com storage.googleapis.com

say "bucket gs://${BUCKET}"
exists storage buckets describe "gs://${BUCKET}" ||
  g storage buckets create "gs://${BUCKET}" --location="$REGION" --uniform-bucket-level-access

say "Artifact Registry repository ${REPO}"
exists artifacts repositories describe "$REPO" --location="$REGION" ||
  g artifacts repositories create "$REPO" --repository-format=docker --location="$REGION"

say "images (Cloud Build)"
build() {  # build <Dockerfile> <image>
  local config
  config="$(mktemp)"
  printf 'steps:\n- name: gcr.io/cloud-builders/docker\n  args: [build, -f, %s, -t, %s, .]\nimages: [%s]\n' \
    "$1" "$2" "$2" >"$config"
  g builds submit "$HERE" --config="$config" --region="$REGION"
  rm -f "$config"
}
[[ -n "${SKIP_BUILD:-}" ]] || { build Dockerfile.trainer "$TRAINER_IMAGE"; build Dockerfile.api "$API_IMAGE"; }

say "service accounts"
exists iam service-accounts describe "$TRAINER_SA" ||
  g iam service-accounts create tuneplane-trainer --display-name="tuneplane trainer"
exists iam service-accounts describe "$API_SA" ||
  g iam service-accounts create tuneplane-api --display-name="tuneplane api"

say "secrets"
secret() {  # secret <name> <value-or-empty>: create it, or add a version when a value is given
  if ! exists secrets describe "$1"; then
    g secrets create "$1" --replication-policy=automatic
    [[ -n "$2" ]] || { echo "secret $1 needs a value the first time" >&2; exit 2; }
  fi
  [[ -z "$2" ]] || printf '%s' "$2" | g secrets versions add "$1" --data-file=-
}
secret "$HF_SECRET" "${HF_TOKEN:-}"
exists secrets describe tuneplane-signing-key || secret tuneplane-signing-key "$(random_hex)"

say "roles"
# Cloud Build runs as the Compute Engine default service account in new projects: it needs to
# read the uploaded source, push the images and write its logs.
BUILD_SA="$(g projects describe "$PROJECT_ID" --format='value(projectNumber)')-compute@developer.gserviceaccount.com"
bucket_role() { g storage buckets add-iam-policy-binding "gs://${BUCKET}" --member="serviceAccount:$1" --role="$2" >/dev/null; }
secret_role() { g secrets add-iam-policy-binding "$1" --member="serviceAccount:$2" --role=roles/secretmanager.secretAccessor >/dev/null; }
project_role() { g projects add-iam-policy-binding "$PROJECT_ID" --member="serviceAccount:$1" --role="$2" --condition=None >/dev/null; }
# The trainer: read models and write artifacts/checkpoints in the bucket, read the HF token.
bucket_role "$TRAINER_SA" roles/storage.objectAdmin
secret_role "$HF_SECRET" "$TRAINER_SA"
project_role "$TRAINER_SA" roles/logging.logWriter
# The api: run and cancel the Job's executions as the trainer, read its own secrets, reach
# Cloud SQL, and sign artifact download URLs with its own account.
project_role "$API_SA" roles/run.developer
project_role "$API_SA" roles/cloudsql.client
g iam service-accounts add-iam-policy-binding "$TRAINER_SA" \
  --member="serviceAccount:${API_SA}" --role=roles/iam.serviceAccountUser >/dev/null
g iam service-accounts add-iam-policy-binding "$API_SA" \
  --member="serviceAccount:${API_SA}" --role=roles/iam.serviceAccountTokenCreator >/dev/null
bucket_role "$API_SA" roles/storage.objectViewer
secret_role tuneplane-signing-key "$API_SA"
for role in roles/storage.objectViewer roles/artifactregistry.writer roles/logging.logWriter; do
  project_role "$BUILD_SA" "$role"
done

say "waiting for IAM to apply the roles (up to ${IAM_WAIT_SECONDS}s)"
# IAM changes "typically" apply within minutes (https://cloud.google.com/iam/docs/access-change-propagation);
# until then the first dispatch gets PERMISSION_DENIED (the api also retries that for
# TUNEPLANE_CLOUD_RUN_WAIT_SECONDS). Wait until the api's account can act as the trainer's.
waited=0
until g iam service-accounts get-iam-policy "$TRAINER_SA" --format=json 2>/dev/null |
    grep -q "serviceAccount:${API_SA}"; do
  (( waited < IAM_WAIT_SECONDS )) || { echo "IAM did not show the roles within ${IAM_WAIT_SECONDS}s; the api retries" >&2; break; }
  sleep 10; waited=$(( waited + 10 ))
done

say "Cloud SQL for PostgreSQL (${DB_INSTANCE}; the first creation takes several minutes)"
if ! exists sql instances describe "$DB_INSTANCE"; then
  g sql instances create "$DB_INSTANCE" --database-version=POSTGRES_16 --tier="$DB_TIER" \
    --region="$REGION" --edition=enterprise
  g sql databases create tuneplane --instance="$DB_INSTANCE"
fi
CONNECTION="$(g sql instances describe "$DB_INSTANCE" --format='value(connectionName)')"
if ! exists secrets describe tuneplane-database-url; then
  DB_PASSWORD="$(random_hex)"
  g sql users create tuneplane --instance="$DB_INSTANCE" --password="$DB_PASSWORD"
  secret tuneplane-database-url \
    "postgresql://tuneplane:${DB_PASSWORD}@/tuneplane?host=/cloudsql/${CONNECTION}"
fi
secret_role tuneplane-database-url "$API_SA"

say "trainer Job ${JOB}-${GPU_SUFFIX}"
vpc_flags=()
if [[ -n "$VPC_NETWORK" ]]; then
  vpc_flags=(--network="$VPC_NETWORK" --vpc-egress="$VPC_EGRESS")
  [[ -z "$VPC_SUBNET" ]] || vpc_flags+=(--subnet="$VPC_SUBNET")
fi
# `--container=trainer`: the api's RunJob overrides name the container; without a name the api
# would have to rewrite the Job first.
g "${RUN_TRACK[@]}" jobs deploy "${JOB}-${GPU_SUFFIX}" \
  --region="$REGION" \
  --tasks=1 \
  --max-retries="$MAX_RETRIES" \
  --task-timeout="${TASK_TIMEOUT_SECONDS}s" \
  --service-account="$TRAINER_SA" \
  --gpu-type="$GPU_TYPE" \
  --no-gpu-zonal-redundancy \
  --add-volume="name=bucket,type=cloud-storage,bucket=${BUCKET},readonly=true" \
  --add-volume="name=hf-cache,type=cloud-storage,bucket=${BUCKET},mount-options=only-dir=hf-cache" \
  --labels=managed-by=tuneplane \
  ${vpc_flags[@]+"${vpc_flags[@]}"} \
  --container=trainer \
  --image="$TRAINER_IMAGE" \
  --cpu="$CPU" \
  --memory="$MEMORY" \
  --gpu=1 \
  --set-secrets="HF_TOKEN=${HF_SECRET}:latest" \
  --set-env-vars="HF_HOME=/mnt/hf-cache" \
  --add-volume-mount="volume=bucket,mount-path=/mnt/bucket" \
  --add-volume-mount="volume=hf-cache,mount-path=/mnt/hf-cache"

say "api service ${SERVICE}"
# The api's own URL must be known before it first starts (trainers post to it, ID tokens are
# checked against it as their audience, and the api refuses to start in cloudrun mode without
# it): Cloud Run's deterministic URL, https://SERVICE-PROJECT_NUMBER.REGION.run.app.
PROJECT_NUMBER="$(g projects describe "$PROJECT_ID" --format='value(projectNumber)')"
PUBLIC_URL="https://${SERVICE}-${PROJECT_NUMBER}.${REGION}.run.app"
# Settings of the api (api/config.py); its secrets stay in Secret Manager (sm:// references).
api_env=(
  "TUNEPLANE_PUBLIC_URL=${PUBLIC_URL}"
  "TUNEPLANE_DISPATCHER=cloudrun"
  "TUNEPLANE_GCP_PROJECT=${PROJECT_ID}"
  "TUNEPLANE_GCP_REGION=${REGION}"
  "TUNEPLANE_CLOUD_RUN_JOB=${JOB}"
  "TUNEPLANE_TRAINER_IMAGE=${TRAINER_IMAGE}"
  "TUNEPLANE_BUCKET=${BUCKET}"
  "TUNEPLANE_TRAINER_SERVICE_ACCOUNT=${TRAINER_SA}"
  "TUNEPLANE_HF_TOKEN_SECRET=${HF_SECRET}"
  "TUNEPLANE_DEFAULT_GPU_TYPE=${GPU_TYPE}"
  "TUNEPLANE_CLOUD_RUN_MAX_RETRIES=${MAX_RETRIES}"
  "TUNEPLANE_CLOUD_RUN_TIMEOUT_MARGIN_MINUTES=${TIMEOUT_MARGIN_MINUTES}"
  "TUNEPLANE_CLOUD_RUN_LONG_GPU_TASKS=${LONG_GPU_TASKS}"
  "TUNEPLANE_CALLBACK_AUTH=oidc"
  "TUNEPLANE_CALLBACK_SIGNING_KEY=sm://projects/${PROJECT_ID}/secrets/tuneplane-signing-key"
  "TUNEPLANE_DATABASE_URL=sm://projects/${PROJECT_ID}/secrets/tuneplane-database-url"
  "TUNEPLANE_AUTH_ENABLED=true"
)
if [[ -n "$VPC_NETWORK" ]]; then
  api_env+=("TUNEPLANE_VPC_NETWORK=${VPC_NETWORK}" "TUNEPLANE_VPC_EGRESS=${VPC_EGRESS}")
  [[ -z "$VPC_SUBNET" ]] || api_env+=("TUNEPLANE_VPC_SUBNET=${VPC_SUBNET}")
fi
joined="$(IFS='|'; echo "${api_env[*]}")"
# The dispatch worker runs inside the api: CPU stays allocated and one instance stays up.
# Unauthenticated at the Cloud Run level on purpose: the api checks API tokens itself, and the
# trainer's callbacks carry their own credential (an ID token of the trainer's account).
g run deploy "$SERVICE" \
  --region="$REGION" \
  --image="$API_IMAGE" \
  --service-account="$API_SA" \
  --add-cloudsql-instances="$CONNECTION" \
  --set-env-vars="^|^${joined}" \
  --no-cpu-throttling \
  --min-instances=1 \
  --allow-unauthenticated

say "done"
echo "api:     ${PUBLIC_URL}"
echo "trainer: ${JOB}-${GPU_SUFFIX} (${GPU_TYPE}), image ${TRAINER_IMAGE}"
echo "Create the first admin token as the README says, then: curl -H 'Authorization: Bearer tp_...' ${PUBLIC_URL}/api/v1/runs"
