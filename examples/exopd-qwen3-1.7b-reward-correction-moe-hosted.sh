# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# exopd-qwen3-1.7b-reward-correction-served.sh with the Qwen3-30B-A3B teacher and its base hosted
# in Megatron instead: both frozen MoE models live on the student's ranks with expert parallelism
# (TP 2, EP 8 over 2 nodes: ~5.2 GB of weights per GPU each), and every estimator works (the
# full-vocabulary and top-k ones need the teacher's logits in every micro-batch, which only a
# hosted teacher gives), at any --teacher-temperature. 2 nodes in all.
#
#   slurm/submit.sh --dry-run examples/exopd-qwen3-1.7b-reward-correction-moe-hosted.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/common.sh
source "$HERE/common.sh"
# shellcheck source=examples/models/qwen3-1.7b.sh
source "$HERE/models/qwen3-1.7b.sh"
# shellcheck source=examples/models/qwen3-30b-a3b.sh
source "$HERE/models/qwen3-30b-a3b.sh"

NODES=2
ROLLOUT_MODEL=$HF/Qwen3-1.7B
ROLLOUT_GPUS_PER_SERVER=$MODEL_ROLLOUT_GPUS_PER_SERVER
# the two frozen 30B models take a share of every GPU: a smaller KV cache for the rollouts
ROLLOUT_SERVER_ARGS=(--mem-fraction-static 0.3 "${MODEL_ROLLOUT_SERVER_ARGS[@]}")

ARGS=(
    "${PAPER_ARGS[@]}"
    "${MODEL_LAYOUT_ARGS[@]}" # TP 2 with sequence parallelism, micro-batch 2
    --expert-model-parallel-size "$MOE_HOSTED_EP"
    "${ROLLOUT_COLOCATE_ARGS[@]}"
    --student-load "$MCORE/Qwen3-1.7B"
    --teacher-load "$MCORE/Qwen3-30B-A3B"
    --ref-load "$MCORE/Qwen3-30B-A3B-Base"
    --gopd-lambda 1.25
    --prompt-data "$DATA/math-train.jsonl"
    --eval-prompt-data "$DATA/math-eval.jsonl"
    --train-iters 500
    --offload-frozen # teacher and reference wait in host memory between scoring passes
)
