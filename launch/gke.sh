#!/usr/bin/env bash
# The GKE route, with xpk (pip install xpk): a cluster with the slice(s), the bucket mounted by the Cloud Storage
# FUSE CSI driver, and a JobSet workload that GKE restarts after a preemption (the trainer resumes from WORKDIR).
# launch/gke.sh CONFIG WORKDIR [--config.x=y ...] [--dry-run]
# Settings: TPU_NAME (the cluster's name; or CLUSTER) ZONE [PROJECT] ACCELERATOR [NUM_SLICES=1]
#           [SPOT=1 | RESERVED=1 with RESERVATION=name] [WORKLOAD=lct-<stage>] [BASE_IMAGE=python:3.11]
#           [MAX_ATTEMPTS=20: JobSet restarts]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
usage() { sed -n '2,7s/^# \{0,1\}//p' "$0"; }
parse_options "$@"
check_slice_env
RUNTIME=${RUNTIME:-unused-on-gke}
check_create_env
run_args "launch/gke.sh CONFIG WORKDIR [--config.x=y ...]"
CLUSTER=${CLUSTER:-$TPU_NAME}
stage=${CONFIG##*/}
WORKLOAD=${WORKLOAD:-lct-${stage%%.py*}}
WORKLOAD=${WORKLOAD//_/-}
BASE_IMAGE=${BASE_IMAGE:-python:3.11}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-20}
int_at_least MAX_ATTEMPTS 0
[[ $CLUSTER =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] || die "CLUSTER=$CLUSTER must be lower-case letters, digits and dashes"
[[ $WORKLOAD =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] || die "WORKLOAD=$WORKLOAD must be lower-case letters, digits and dashes"
capacity=(--on-demand)
((SPOT)) && capacity=(--spot)
if ((RESERVED)); then
  need RESERVATION "the reservation's name, for RESERVED=1 on GKE"
  capacity=(--reservation="$RESERVATION")
fi
act xpk cluster create --cluster="$CLUSTER" --tpu-type="$ACCELERATOR" --num-slices="$NUM_SLICES" "${capacity[@]}" "${GC[@]}"
if [[ -n $BUCKET ]]; then
  act xpk storage attach "$BUCKET" --type=gcsfuse --bucket="$BUCKET" --cluster="$CLUSTER" --auto-mount=true \
    --mount-point="/gcs/$BUCKET" --readonly=false --size=1000 "${GC[@]}"
fi
train=$(qall python -m lct_jax.train --config="$CONFIG" --workdir="$HOST_WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
  ${MESH_ARGS[@]+"${MESH_ARGS[@]}"})
act xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$ACCELERATOR" \
  --num-slices="$NUM_SLICES" --base-docker-image="$BASE_IMAGE" --script-dir="$REPO_DIR" \
  --command="pip install -q -e '.[tpu]' && $train" --max-restarts="$MAX_ATTEMPTS" "${GC[@]}"
((DRY_RUN)) || say "submitted; follow it with: xpk workload list --cluster=$CLUSTER ${GC[*]}"
