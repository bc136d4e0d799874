#!/usr/bin/env bash
# One task per node, started by slurm/gopd.sbatch through srun:
#   node.sh train   [launcher args]   rollout servers (colocated mode), then torchrun
#   node.sh rollout [launcher args]   the rollout servers of a disaggregated rollout node
# Writes the node's log, forwards SIGTERM/SIGINT to what it started, turns the launcher's USR1
# into STOP_SIGNAL for the training ranks (checkpoint and stop), and never leaves a child behind:
# on any exit it stops the servers and torchrun (SIGTERM, then SIGKILL after a grace).
# The node's exit status is torchrun's (a rollout node stopped by the job exits 0), so a failure
# on any node fails the srun step, and --kill-on-bad-exit stops every other node.
set -euo pipefail

GOPD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=slurm/lib.sh
source "$GOPD_ROOT/slurm/lib.sh"

on_signal() {
    GOPD_STOPPING=1
    gopd_log "received SIG$1: stopping this node's processes"
    gopd_stop_children TERM
}

on_exit() {
    local rc=$? pid
    trap - TERM INT USR1
    GOPD_STOPPING=1
    gopd_stop_children TERM
    for pid in $GOPD_TRAIN_PID "${GOPD_SERVER_PIDS[@]}"; do gopd_reap "$pid"; done
    rm -f "${GOPD_AUTH_FILES[@]}"
    gopd_log "node exits with status $rc"
    exit "$rc"
}

main() {
    local role=${1:-}
    [[ $role == train || $role == rollout ]] || gopd_die "usage: node.sh train|rollout [launcher args]"
    shift
    gopd_parse_args "$@"
    gopd_load
    gopd_plan
    # SLURM_NODEID counts from 0 within the step; the rollout step starts after the training nodes
    local idx=${SLURM_NODEID:?node.sh runs inside an srun step}
    [[ $role == rollout ]] && idx=$((NODES + idx))
    local host=${GOPD_HOSTS[idx]}
    if [[ -n ${SLURMD_NODENAME:-} && $SLURMD_NODENAME != "$host" ]]; then
        gopd_die "node index $idx is $host in the plan but this is $SLURMD_NODENAME"
    fi
    mkdir -p "$GOPD_LOG_DIR"
    local log=$GOPD_LOG_DIR/node$idx-$host.log
    gopd_log "node $idx ($host): $role; log $log"
    exec >>"$log" 2>&1
    gopd_log "=== job $GOPD_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, node $idx ($host), $role ==="
    GOPD_SERVER_PIDS=()
    GOPD_TRAIN_PID=""
    GOPD_AUTH_FILES=()
    trap 'on_signal TERM' TERM
    trap 'on_signal INT' INT
    trap gopd_checkpoint_and_stop USR1
    trap on_exit EXIT
    gopd_node_main "$role" "$idx"
}

main "$@"
