#!/usr/bin/env bash
# Runs on every host of the slice (setup.sh, run.sh, up.sh, stop.sh call it over ssh): host.sh setup|start|status|stop
#   setup [BUCKET]                  venv + pip install -e '.[tpu]' here; with BUCKET, also mount gs://BUCKET at
#                                   /gcs/BUCKET with Cloud Storage FUSE (installed if missing), so that a gs://
#                                   workdir is a path the trainer can write (it writes POSIX paths)
#   start CONFIG WORKDIR [ARGS...]  python -m lct_jax.train ... in the background; its output is appended to
#                                   logs/train.log, its exit status written to logs/train.rc; refused (exit 3)
#                                   while the trainer started before is still running
#   status                          running | the last trainer's exit status | none
#   stop                            SIGTERM to the trainer: it saves a checkpoint at its current step and exits 0
# LCT_HOME (default ~/lct_jax) is the checkout, LCT_PYTHON (default LCT_HOME/.venv/bin/python) the interpreter.
set -euo pipefail
home=${LCT_HOME:-$HOME/lct_jax}
python=${LCT_PYTHON:-$home/.venv/bin/python}
cd "$home"
mkdir -p logs
pidfile=logs/train.pid

running() { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case ${1:-} in
  setup)
    python3 -m venv .venv
    .venv/bin/pip install -q -e '.[tpu]'
    if (($# > 1)); then
      bucket=$2 mnt=/gcs/$2
      if ! command -v gcsfuse >/dev/null; then
        echo "deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" |
          sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
        curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null
        sudo apt-get -qq update && sudo apt-get -qq install -y gcsfuse
      fi
      sudo mkdir -p "$mnt" && sudo chown "$USER" "$mnt"
      # Orbax renames a finished step directory into place, and every host must see the others' files at once
      mountpoint -q "$mnt" || gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 "$bucket" "$mnt"
    fi
    echo "set up on $(hostname)"
    ;;
  start)
    shift
    (($# >= 2)) || {
      echo "error: usage: host.sh start CONFIG WORKDIR [ARGS...]" >&2
      exit 2
    }
    if running; then
      echo "error: a trainer is already running on $(hostname) (pid $(cat "$pidfile")); stop it first: launch/stop.sh" >&2
      exit 3
    fi
    rm -f logs/train.rc
    {
      date -u "+=== %FT%TZ start on $(hostname)"
      printf '%q ' "$python" -m lct_jax.train --config="$1" --workdir="$2" "${@:3}"
      echo
    } >>logs/train.log
    # the wrapper (its pid in logs/train.pid) outlives the ssh session and records the trainer's exit status
    # shellcheck disable=SC2016  # expanded by the inner bash
    nohup bash -c '"$@" >>logs/train.log 2>&1; echo $? >logs/train.rc' _ \
      "$python" -m lct_jax.train --config="$1" --workdir="$2" "${@:3}" >/dev/null 2>&1 &
    echo $! >"$pidfile"
    echo "started on $(hostname) (pid $!)"
    ;;
  status)
    if running; then
      echo running
    elif [[ -f logs/train.rc ]]; then
      cat logs/train.rc
    else
      echo none
    fi
    ;;
  stop)
    if running; then pkill -TERM -P "$(cat "$pidfile")" || true; fi
    ;;
  *)
    echo "error: usage: host.sh setup [BUCKET] | start CONFIG WORKDIR [ARGS...] | status | stop" >&2
    exit 2
    ;;
esac
