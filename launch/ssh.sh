#!/usr/bin/env bash
# A shell (or one command) on a host of the slice: launch/ssh.sh [WORKER=0] [NODE=0] [-- COMMAND...] [--dry-run]
#   WORKER: a host index in the slice, or all; NODE: the slice index for NUM_SLICES > 1, or all
# Settings: TPU_NAME ZONE [PROJECT]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
usage() { sed -n '2,4s/^# \{0,1\}//p' "$0"; }
parse_options "$@"
check_slice_env
worker=0 node=0 command=()
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  if [[ $1 == -- ]]; then
    shift
    command=("$@")
    break
  fi
  if [[ -z ${got_worker:-} ]]; then worker=$1 got_worker=1; else node=$1; fi
  shift
done
[[ $worker =~ ^(all|[0-9]+)$ ]] || die "WORKER=$worker must be a host index (0, 1, ...) or all"
[[ $node =~ ^(all|[0-9]+)$ ]] || die "NODE=$node must be a slice index (0, 1, ...) or all"
if ((${#command[@]})); then
  qr ssh "$TPU_NAME" --node="$node" --worker="$worker" --command="$(qall "${command[@]}")"
else
  [[ $worker != all && $node != all ]] || die "an interactive shell needs one host: give WORKER and NODE indices"
  qr ssh "$TPU_NAME" --node="$node" --worker="$worker"
fi
