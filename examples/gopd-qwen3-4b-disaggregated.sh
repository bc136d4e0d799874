# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# The colocated G-OPD recipe with the rollouts moved to nodes of their own: 2 training nodes and
# 2 rollout nodes (4 SGLang servers of TP=2 each); the trainer reaches them via --rollout-urls.
#
#   slurm/submit.sh --dry-run examples/gopd-qwen3-4b-disaggregated.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/gopd-qwen3-4b-colocated.sh
source "$HERE/gopd-qwen3-4b-colocated.sh"

NODES=2
ROLLOUT_MODE=disaggregated
ROLLOUT_NODES=2
# the servers have their GPUs to themselves
ROLLOUT_SERVER_ARGS=(--mem-fraction-static 0.85 --context-length 16384 --dtype bfloat16)
# drop the colocated-only flag
for i in "${!ARGS[@]}"; do [[ ${ARGS[i]} == --rollout-colocate ]] && unset 'ARGS[i]'; done
ARGS=("${ARGS[@]}")
