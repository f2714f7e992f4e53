#!/usr/bin/env bash
# Supervisor: get the slice, set it up, train, and after a preemption do it all again, until the run's final
# checkpoint exists: launch/up.sh CONFIG WORKDIR --config.num_steps=N [--config.x=y ...] [--dry-run]
#   Each attempt: the queued resource is created (or, when SUSPENDED/FAILED after a preemption, deleted and
#   created again) -> wait until ACTIVE -> setup (after every new slice) -> start the trainers -> watch every
#   POLL_S s: WORKDIR/checkpoints/N/commit_success.txt (done), the queued-resource state (not ACTIVE: next
#   attempt) and the trainers (all exited cleanly, i.e. SIGTERM: next attempt; one failed: stop, logs fetched).
#   A failed gcloud create/delete/setup/start also just ends the attempt. Stops after MAX_ATTEMPTS attempts.
#   Exit 0 = the final step exists; 1 = stopped (the reason is printed).
# Settings: TPU_NAME ZONE [PROJECT] ACCELERATOR RUNTIME [SPOT=1 | RESERVED=1] [NUM_SLICES=1]
#           [MAX_ATTEMPTS=20] [POLL_S=60] [WAIT_ACTIVE_S=21600]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
usage() { sed -n '2,11s/^# \{0,1\}//p' "$0"; }
parse_options "$@"
check_slice_env
check_create_env
run_args "launch/up.sh CONFIG WORKDIR --config.num_steps=N [--config.x=y ...]"
final=""
for a in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  if [[ $a =~ ^--config\.num_steps=(.*)$ ]]; then final=${BASH_REMATCH[1]}; fi
done
[[ $final =~ ^[1-9][0-9]*$ ]] ||
  die "give --config.num_steps=N (N >= 1): up.sh is done when $WORKDIR/checkpoints/N/commit_success.txt exists"
MAX_ATTEMPTS=${MAX_ATTEMPTS:-20} POLL_S=${POLL_S:-60} WAIT_ACTIVE_S=${WAIT_ACTIVE_S:-21600}
int_at_least MAX_ATTEMPTS 1
int_at_least POLL_S 0
int_at_least WAIT_ACTIVE_S 1
marker="$WORKDIR/checkpoints/$final/commit_success.txt"

final_exists() { # gs://: gcloud storage; a shared path: look from host 0 (false while the slice is down)
  if [[ -n $BUCKET ]]; then
    ASSUME="" ask gcloud storage ls "$marker"
  else
    ASSUME="" ask gcloud compute tpus queued-resources ssh "$TPU_NAME" --node=0 --worker=0 \
      --command="test -e $(q "$marker") && echo found" "${GC[@]}"
  fi
  ((ASK_RC == 0)) && [[ -n $ASK_OUT ]]
}

# TRAINERS := running (on some host) | failed (one exited non-zero) | exited (all exited 0, or were killed
# without a status, e.g. by a host restart) | unknown (no answer)
trainer_status() {
  ASSUME=running ask gcloud compute tpus queued-resources ssh "$TPU_NAME" --node=all --worker=all \
    --command="bash ~/$REMOTE_DIR/launch/host.sh status" "${GC[@]}"
  local words
  words=$(printf '%s\n' "$ASK_OUT" | grep -E '^(running|none|[0-9]+)$' | sort -u | tr '\n' ' ' || true)
  if ((ASK_RC)) || [[ -z $words ]]; then
    TRAINERS=unknown
  elif [[ $words == *running* ]]; then
    TRAINERS=running
  elif [[ " $words" =~ \ [1-9][0-9]*\  ]]; then
    TRAINERS=failed
  else
    TRAINERS=exited
  fi
}

stop() {
  say "stop: $*"
  exit 1
}

attempt=0 unknown=0 needs_setup=1
while :; do
  if final_exists; then
    say "done: $marker exists"
    exit 0
  fi
  ((attempt < MAX_ATTEMPTS)) || stop "MAX_ATTEMPTS=$MAX_ATTEMPTS attempts used and step $final is not in $WORKDIR"
  attempt=$((attempt + 1))
  say "attempt $attempt of $MAX_ATTEMPTS"
  ASSUME=NOT_FOUND qr_state
  case $STATE in
    NOT_FOUND) new=1 ;;
    SUSPENDING | SUSPENDED | FAILED)
      say "queued resource $TPU_NAME is $STATE (preempted or failed): deleting it and queueing a new one"
      if ! delete_slice; then
        say "the delete failed (gcloud's message above); next attempt in $POLL_S s"
        pause "$POLL_S"
        continue
      fi
      new=1
      ;;
    ACTIVE | ACCEPTED | CREATING | PROVISIONING | WAITING_FOR_RESOURCES) new=0 ;;
    *) stop "queued resource $TPU_NAME is in state $STATE, which up.sh does not handle; look with gcloud" ;;
  esac
  if ((new)); then
    if ! create_slice; then
      say "the create failed (gcloud's message above); next attempt in $POLL_S s"
      pause "$POLL_S"
      continue
    fi
    needs_setup=1
  fi
  if ! wait_active; then
    say "$REASON"
    continue
  fi
  if ((needs_setup)); then
    if ! setup_slice; then
      say "the setup failed on some host (its message above); next attempt"
      continue
    fi
    needs_setup=0
  fi
  if ! start_training "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"}; then
    say "the trainers did not start on every host (see above); next attempt"
    continue
  fi
  if ((DRY_RUN)); then # one pass of the watch loop, then stop: nothing ran, so nothing more can be known
    final_exists || true
    ASSUME=ACTIVE qr_state
    trainer_status
    say "dry run: would watch every $POLL_S s until $marker exists, re-creating the slice after a preemption (at most $MAX_ATTEMPTS attempts)"
    exit 0
  fi
  while :; do
    pause "$POLL_S"
    if final_exists; then
      say "done: $marker exists"
      exit 0
    fi
    qr_state
    if [[ $STATE != ACTIVE ]]; then
      say "queued resource $TPU_NAME is $STATE: the slice was preempted or lost"
      break
    fi
    trainer_status
    case $TRAINERS in
      running) unknown=0 ;;
      exited)
        say "every trainer exited cleanly before step $final (SIGTERM: preemption or maintenance); starting over"
        break
        ;;
      failed)
        fetch_logs "logs/$TPU_NAME"
        stop "a trainer failed on a healthy slice before step $final; see logs/$TPU_NAME (run launch/up.sh again after fixing it)"
        ;;
      unknown)
        unknown=$((unknown + 1))
        ((unknown < 10)) || stop "10 looks in a row could not reach the trainers on an ACTIVE slice; see launch/logs.sh"
        ;;
    esac
  done
done
