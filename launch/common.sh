# shellcheck shell=bash disable=SC2034  # (globals set here for the scripts: STATE, REASON, HOST_WORKDIR, ...)
# Shared by the launch scripts (sourced after `set -euo pipefail`): settings, their checks, and the command runner.
# Every gcloud call goes through `act` (changes something) or `ask` (reads something); both print the exact
# command first ("+ gcloud ..."), and with --dry-run neither runs anything. Bash 3.2+ (macOS) is enough.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$LAUNCH_DIR/.." && pwd)
REMOTE_DIR=lct_jax # checkout on every host: ~/lct_jax (venv in ~/lct_jax/.venv, logs in ~/lct_jax/logs)
DRY_RUN=0
ARGS=()

die() {
  echo "error: $*" >&2
  exit 2
}

say() { echo "${0##*/}: $*"; }

# one word as a shell would need it: bare when safe, else in single quotes
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# the words as one paste-able command line
qall() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}

act() { # a command that changes something: printed, then run unless --dry-run
  echo "+ $(qall "$@")"
  ((DRY_RUN)) || "$@"
}

ask() { # a read-only query: printed, run, ASK_OUT/ASK_ERR/ASK_RC set; with --dry-run ASK_OUT=$ASSUME, nothing run
  echo "+ $(qall "$@")"
  ASK_OUT="" ASK_ERR="" ASK_RC=0
  if ((DRY_RUN)); then
    ASK_OUT=${ASSUME:-}
    return 0
  fi
  local err
  err=$(mktemp)
  ASK_OUT=$("$@" 2>"$err") || ASK_RC=$?
  ASK_ERR=$(cat "$err")
  rm -f "$err"
}

pause() { ((DRY_RUN)) || sleep "$1"; }

# --dry-run and -h/--help anywhere; the rest stays in ARGS (in order)
parse_options() {
  local a
  for a in "$@"; do
    case $a in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      *) ARGS+=("$a") ;;
    esac
  done
}

need() { # need VAR 'what it is, e.g. example'
  [[ -n ${!1:-} ]] || die "set $1 ($2)"
}

int_at_least() { # int_at_least VAR MIN
  if ! [[ ${!1} =~ ^[0-9]+$ ]] || ((${!1} < $2)); then die "$1=${!1} must be an integer >= $2"; fi
}

# slice settings (all scripts)
check_slice_env() {
  need TPU_NAME "the slice's queued-resource and node name, e.g. lct-v5e-256"
  need ZONE "e.g. us-west4-a"
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]{0,46}[a-z0-9])?$ ]] ||
    die "TPU_NAME=$TPU_NAME must be lower-case letters, digits and dashes, start with a letter, at most 48 long"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "ZONE=$ZONE is not a zone such as us-west4-a"
  [[ -z ${PROJECT:-} || $PROJECT =~ ^[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] ||
    die "PROJECT=$PROJECT is not a project id (6-30 lower-case letters, digits, dashes)"
  NUM_SLICES=${NUM_SLICES:-1}
  int_at_least NUM_SLICES 1
  GC=(--zone="$ZONE")
  if [[ -n ${PROJECT:-} ]]; then GC+=(--project="$PROJECT"); fi
}

# what creating a slice needs
check_create_env() {
  need ACCELERATOR "the slice type, e.g. v5litepod-256, v4-128, v5p-256, v6e-256"
  need RUNTIME "the TPU VM image, e.g. v2-alpha-tpuv5-lite (v5e), tpu-ubuntu2204-base (v4/v5p), v2-alpha-tpuv6e"
  [[ $ACCELERATOR =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "ACCELERATOR=$ACCELERATOR is not a type such as v5litepod-256"
  [[ $RUNTIME =~ ^[a-z0-9][-a-z0-9._]*$ ]] || die "RUNTIME=$RUNTIME is not a runtime version such as v2-alpha-tpuv5-lite"
  SPOT=${SPOT:-0} RESERVED=${RESERVED:-0}
  [[ $SPOT =~ ^[01]$ ]] || die "SPOT=$SPOT must be 0 or 1"
  [[ $RESERVED =~ ^[01]$ ]] || die "RESERVED=$RESERVED must be 0 or 1"
  ((SPOT + RESERVED < 2)) || die "SPOT=1 and RESERVED=1 exclude each other: spot capacity or your reservation"
}

# WORKDIR: a gs:// path (every host mounts the bucket with Cloud Storage FUSE at /gcs/<bucket>) or an absolute
# path on a filesystem every host mounts at the same place. HOST_WORKDIR is what the trainer is given.
check_workdir() {
  local w=$1
  if [[ $w =~ ^gs://([a-z0-9][-a-z0-9_.]{1,61}[a-z0-9])(/[^[:space:]]*)?$ ]]; then
    BUCKET=${BASH_REMATCH[1]}
    local rest=${BASH_REMATCH[2]:-}
    HOST_WORKDIR="/gcs/$BUCKET${rest%/}"
  elif [[ $w =~ ^/[^[:space:]]*$ ]]; then
    BUCKET="" HOST_WORKDIR=${w%/}
  else
    die "WORKDIR=$w must be gs://BUCKET/PATH or an absolute path every host shares (no spaces)"
  fi
}

check_config() { # configs/<stage>.py[:args], relative to the checkout
  local file=${1%%:*}
  [[ -f $REPO_DIR/$file ]] || die "config file $file not found in $REPO_DIR (e.g. configs/text_extension.py:size=7b)"
  [[ $1 =~ ^[-A-Za-z0-9_./]+(:[-A-Za-z0-9_.,=]+)?$ ]] || die "config $1 must look like configs/<stage>.py:size=7b"
}

check_overrides() { # only --config.<field>=<value> and the trainer's own flags
  local a
  for a in "$@"; do
    [[ $a =~ ^--config\.[A-Za-z0-9_.]+=.*$ || $a =~ ^--(distributed|distributed_timeout|coordinator_address|num_processes|process_id|coordinator_bind_address|local_device_ids)=.+$ ]] ||
      die "'$a' is not a trainer override (--config.<field>=<value>)"
  done
}

# the mesh for NUM_SLICES slices: slices go on the 'data' axis (DCN), everything else stays inside a slice
mesh_overrides() {
  MESH_ARGS=()
  ((NUM_SLICES > 1)) || return 0
  local a data=""
  for a in "$@"; do [[ $a =~ ^--config\.mesh\.data=(.*)$ ]] && data=${BASH_REMATCH[1]}; done
  if [[ -z $data ]]; then
    MESH_ARGS=(--config.mesh.data="$NUM_SLICES")
  elif ! [[ $data =~ ^[0-9]+$ ]] || ((data % NUM_SLICES)); then
    die "--config.mesh.data=$data must be a multiple of NUM_SLICES=$NUM_SLICES (the slices span the 'data' axis)"
  fi
}

# ARGS = CONFIG WORKDIR [--config.x=y ...], checked: CONFIG, WORKDIR, OVERRIDES (+ HOST_WORKDIR, BUCKET, MESH_ARGS)
run_args() { # USAGE
  ((${#ARGS[@]} >= 2)) || die "usage: $1"
  CONFIG=${ARGS[0]} WORKDIR=${ARGS[1]%/}
  check_config "$CONFIG"
  check_workdir "$WORKDIR"
  OVERRIDES=("${ARGS[@]:2}")
  check_overrides ${OVERRIDES[@]+"${OVERRIDES[@]}"}
  mesh_overrides ${OVERRIDES[@]+"${OVERRIDES[@]}"}
}

qr() { act gcloud compute tpus queued-resources "$@" "${GC[@]}"; }

# all workers of all nodes (slices) of the queued resource
on_all_hosts() { qr ssh "$TPU_NAME" --node=all --worker=all --command="$1"; }

# STATE := ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ... or NOT_FOUND; any other answer is an error
qr_state() {
  ask gcloud compute tpus queued-resources describe "$TPU_NAME" "${GC[@]}" --format='value(state.state)'
  if ((ASK_RC)); then
    [[ $ASK_ERR == *NOT_FOUND* || $ASK_ERR == *"not found"* ]] || die "gcloud could not describe queued resource $TPU_NAME (rc $ASK_RC): ${ASK_ERR:0:300}"
    STATE=NOT_FOUND
    return 0
  fi
  STATE=${ASK_OUT//[[:space:]]/}
  [[ $STATE =~ ^[A-Z_]+$ ]] || die "queued resource $TPU_NAME: unexpected state '${STATE:0:100}'"
}

create_slice() {
  local nodes=(--node-id="$TPU_NAME") capacity=()
  ((NUM_SLICES == 1)) || nodes=(--node-count="$NUM_SLICES" --node-prefix="$TPU_NAME")
  ((SPOT)) && capacity=(--spot)
  ((RESERVED)) && capacity=(--reserved)
  qr create "$TPU_NAME" "${nodes[@]}" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
    ${capacity[@]+"${capacity[@]}"}
}

delete_slice() { qr delete "$TPU_NAME" --force --quiet; }

# poll until ACTIVE (0) or a state that will not become ACTIVE / WAIT_ACTIVE_S seconds (1, REASON set)
wait_active() {
  local deadline=$((SECONDS + WAIT_ACTIVE_S))
  while :; do
    ASSUME=ACTIVE qr_state
    case $STATE in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING | NOT_FOUND)
        REASON="queued resource $TPU_NAME is $STATE while waiting for it to become ACTIVE"
        return 1
        ;;
    esac
    if ((SECONDS >= deadline)); then
      REASON="queued resource $TPU_NAME still $STATE after WAIT_ACTIVE_S=$WAIT_ACTIVE_S s"
      return 1
    fi
    say "queued resource $TPU_NAME is $STATE; next look in $POLL_S s"
    pause "$POLL_S"
  done
}

# the checkout (without venv, git, caches, local runs) to every host, then `host.sh setup` there: installed with
# the TPU extra, and a gs:// workdir's bucket mounted with Cloud Storage FUSE at /gcs/<bucket>
setup_slice() {
  local tarball="${TMPDIR:-/tmp}/lct_jax_src.$TPU_NAME.tgz"
  act tar -C "$REPO_DIR" --exclude=./.venv --exclude=./.git --exclude='*/__pycache__' --exclude=./runs --exclude=./logs \
    -czf "$tarball" . &&
    qr scp "$tarball" "$TPU_NAME:/tmp/lct_jax_src.tgz" --node=all --worker=all &&
    on_all_hosts "mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/lct_jax_src.tgz -C ~/$REMOTE_DIR && bash ~/$REMOTE_DIR/launch/host.sh setup${BUCKET:+ $BUCKET}"
}

# launch/host.sh (copied by setup) on every host; start: python -m lct_jax.train in the background there
host_cmd() { on_all_hosts "bash ~/$REMOTE_DIR/launch/host.sh $(qall "$@")"; }

start_training() { # CONFIG ARGS...
  local config=$1
  shift
  host_cmd start "$config" "$HOST_WORKDIR" "$@" ${MESH_ARGS[@]+"${MESH_ARGS[@]}"}
}

# every host's ~/lct_jax/logs/train.log into DEST, one file per host (gcloud names them by node and worker)
fetch_logs() { # DEST
  local cmd="cat ~/$REMOTE_DIR/logs/train.log"
  if [[ -n ${LOG_LINES:-} ]]; then
    int_at_least LOG_LINES 1
    cmd="tail -n $LOG_LINES ~/$REMOTE_DIR/logs/train.log"
  fi
  act mkdir -p "$1"
  qr ssh "$TPU_NAME" --node=all --worker=all --command="$cmd" --output-directory="$1"
}
