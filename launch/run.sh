#!/usr/bin/env bash
# Start training on every host of the slice (in the background): launch/run.sh CONFIG WORKDIR [--config.x=y ...]
#   CONFIG   configs/<stage>.py:size=..., relative to the checkout; WORKDIR gs://BUCKET/PATH or a shared absolute path
#   Each host appends to ~/lct_jax/logs/train.log (launch/logs.sh fetches them) and refuses to start while its
#   previous trainer runs. Re-running after a preemption resumes from WORKDIR's latest checkpoint.
# Settings: TPU_NAME ZONE [PROJECT] [NUM_SLICES=1: slices are put on the mesh's 'data' axis]  [--dry-run]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
usage() { sed -n '2,6s/^# \{0,1\}//p' "$0"; }
parse_options "$@"
check_slice_env
run_args "launch/run.sh CONFIG WORKDIR [--config.x=y ...]"
start_training "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
say "started on every host of $TPU_NAME; logs: launch/logs.sh"
