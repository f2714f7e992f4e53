#!/usr/bin/env bash
# Copy this checkout to every host of the slice and install it with the TPU extra: launch/setup.sh [--dry-run]
# Settings: TPU_NAME ZONE [PROJECT] [NUM_SLICES=1] [WORKDIR=gs://BUCKET/PATH: also mounts BUCKET at /gcs/BUCKET]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
usage() { sed -n '2,3s/^# \{0,1\}//p' "$0"; }
parse_options "$@"
((${#ARGS[@]} == 0)) || die "setup.sh takes no arguments (got ${ARGS[*]})"
check_slice_env
if [[ -n ${WORKDIR:-} ]]; then check_workdir "$WORKDIR"; fi
setup_slice
