#!/usr/bin/env bash
# Get a slice through a queued resource and wait until it is ACTIVE: launch/create.sh [--dry-run]
# Settings: TPU_NAME ZONE [PROJECT] ACCELERATOR RUNTIME [SPOT=1 | RESERVED=1] [NUM_SLICES=1]
#           [WAIT_ACTIVE_S=21600] [POLL_S=60]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
usage() { sed -n '2,4s/^# \{0,1\}//p' "$0"; }
parse_options "$@"
((${#ARGS[@]} == 0)) || die "create.sh takes no arguments (got ${ARGS[*]}); settings come from the environment"
check_slice_env
check_create_env
WAIT_ACTIVE_S=${WAIT_ACTIVE_S:-21600} POLL_S=${POLL_S:-60}
int_at_least WAIT_ACTIVE_S 1
int_at_least POLL_S 0
create_slice
wait_active || die "$REASON"
say "queued resource $TPU_NAME is ACTIVE; next: launch/setup.sh"
