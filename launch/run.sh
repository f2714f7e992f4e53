#!/usr/bin/env bash
# Start the same training command on every host: launch/run.sh CONFIG WORKDIR [--config.x=y ...]
set -euo pipefail
. "$(dirname "$0")/common.sh"
config=${1:?usage: run.sh configs/<stage>.py:size=7b WORKDIR [overrides...]}
workdir=${2:?usage: run.sh CONFIG WORKDIR [overrides...]}
shift 2
extra=$(printf ' %q' "$@")
tpu ssh "$TPU_NAME" --worker=all --command="cd ~/$REMOTE_DIR && . .venv/bin/activate && \
  nohup python -m lct_jax.train --config=$config --workdir=$workdir$extra > train.log 2>&1 &"
echo "started on all hosts of $TPU_NAME; logs: launch/ssh.sh 0, then tail -f ~/$REMOTE_DIR/train.log"
