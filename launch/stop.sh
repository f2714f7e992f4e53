#!/usr/bin/env bash
# Stop training on every host: SIGTERM, so each trainer saves a checkpoint at its current step and exits.
# launch/stop.sh [--dry-run]      Settings: TPU_NAME ZONE [PROJECT]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
usage() { sed -n '2,3s/^# \{0,1\}//p' "$0"; }
parse_options "$@"
((${#ARGS[@]} == 0)) || die "stop.sh takes no arguments (got ${ARGS[*]})"
check_slice_env
host_cmd stop
