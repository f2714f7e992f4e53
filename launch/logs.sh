#!/usr/bin/env bash
# The training logs of every host into DEST (default logs/TPU_NAME), one file per host: launch/logs.sh [DEST]
#   LOG_LINES=N: only the last N lines of each (default: all)            [--dry-run]
# Settings: TPU_NAME ZONE [PROJECT]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
usage() { sed -n '2,4s/^# \{0,1\}//p' "$0"; }
parse_options "$@"
((${#ARGS[@]} <= 1)) || die "usage: launch/logs.sh [DEST]"
check_slice_env
fetch_logs "${ARGS[0]:-logs/$TPU_NAME}"
