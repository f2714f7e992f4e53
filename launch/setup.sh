#!/usr/bin/env bash
# Copy this checkout to every host of the slice and install it with the TPU extra.
set -euo pipefail
. "$(dirname "$0")/common.sh"
repo="$(cd "$(dirname "$0")/.." && pwd)"
tar -C "$repo" --exclude=.venv --exclude=.git -czf /tmp/lct_jax_src.tgz .
tpu scp /tmp/lct_jax_src.tgz "$TPU_NAME":/tmp/lct_jax_src.tgz --worker=all
tpu ssh "$TPU_NAME" --worker=all --command="mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/lct_jax_src.tgz -C ~/$REMOTE_DIR \
  && cd ~/$REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'"
