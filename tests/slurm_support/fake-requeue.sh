# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# Test recipe: one training node and one disaggregated rollout node (stub server); the trainer
# counts STEPS steps with a checkpoint after each. The test sends the time-limit warning (USR1)
# early: the job must checkpoint, requeue itself, resume from the checkpoint and finish.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:?set OUT to the output directory of the test}
STEPS=${STEPS:-40}
NODES=1
GPUS_PER_NODE=0
NPROC_PER_NODE=2
TIME_LIMIT=10:00
TIME_LIMIT_WARNING=60
REQUEUE=1
ENTRY=("$HERE/fake_trainer.py")
ARGS=(--out "$OUT" --mode train --steps "$STEPS" --step-seconds 0.25)
ROLLOUT_MODE=disaggregated
ROLLOUT_NODES=1
ROLLOUT_SERVERS_PER_NODE=1
ROLLOUT_HEALTH_TIMEOUT=60

rollout_server_command() {
    CMD=("$SITE_PYTHON" "$HERE/stub_rollout_server.py" "$3" "$OUT")
}
