# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# Test recipe: two training nodes with a colocated stub rollout server each; the rank on node 1
# fails, the rank on node 0 hangs. The job must end with a failure and leave no process behind.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:?set OUT to the output directory of the test}
NODES=2
GPUS_PER_NODE=0
NPROC_PER_NODE=1
TIME_LIMIT=10:00
TIME_LIMIT_WARNING=60
ENTRY=("$HERE/fake_trainer.py")
ARGS=(--out "$OUT" --mode fail --fail-node 1)
ROLLOUT_MODE=colocated
ROLLOUT_SERVERS_PER_NODE=1
ROLLOUT_HEALTH_TIMEOUT=60

# the launcher's hook for the server command: a stub instead of SGLang
rollout_server_command() {
    CMD=("$SITE_PYTHON" "$HERE/stub_rollout_server.py" "$3" "$OUT")
}
