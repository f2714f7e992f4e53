# Shared settings for the launch scripts (sourced). Override with environment variables.
: "${TPU_NAME:?set TPU_NAME, e.g. lct-v5e-256}"
: "${ZONE:?set ZONE, e.g. us-west4-a}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-lct_jax}
tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" $PROJECT_FLAG; }
