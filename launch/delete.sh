#!/usr/bin/env bash
# Delete the slice: its queued resource and every node in it: launch/delete.sh [--dry-run]
# Settings: TPU_NAME ZONE [PROJECT]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
usage() { sed -n '2,3s/^# \{0,1\}//p' "$0"; }
parse_options "$@"
((${#ARGS[@]} == 0)) || die "delete.sh takes no arguments (got ${ARGS[*]})"
check_slice_env
delete_slice
