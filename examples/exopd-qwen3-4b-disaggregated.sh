# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# exopd-qwen3-4b.sh with the rollouts on nodes of their own: 2 training nodes and 2 rollout nodes
# (16 SGLang servers of TP 1); the trainer reaches them through --rollout-urls.
#
#   slurm/submit.sh --dry-run examples/exopd-qwen3-4b-disaggregated.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/exopd-qwen3-4b.sh
source "$HERE/exopd-qwen3-4b.sh"

NODES=2
ROLLOUT_MODE=disaggregated
ROLLOUT_NODES=2
# the servers have their GPUs to themselves: no memory release, a bigger KV cache
ROLLOUT_SERVER_ARGS=(--mem-fraction-static 0.85 "${MODEL_ROLLOUT_SERVER_ARGS[@]}")
for i in "${!ARGS[@]}"; do [[ ${ARGS[i]} == --rollout-colocate ]] && unset 'ARGS[i]'; done
ARGS=("${ARGS[@]}")
