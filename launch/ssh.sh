#!/usr/bin/env bash
# A shell on one host of the slice: launch/ssh.sh [WORKER=0]
set -euo pipefail
. "$(dirname "$0")/common.sh"
tpu ssh "$TPU_NAME" --worker="${1:-0}"
