#!/usr/bin/env bash
# Create a Cloud TPU VM slice: ACCELERATOR (e.g. v5litepod-256) with RUNTIME (e.g. v2-alpha-tpuv5-lite).
set -euo pipefail
. "$(dirname "$0")/common.sh"
: "${ACCELERATOR:?set ACCELERATOR, e.g. v5litepod-256}"
: "${RUNTIME:?set RUNTIME, e.g. v2-alpha-tpuv5-lite}"
tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ${SPOT:+--spot}
