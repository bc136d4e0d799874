# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# Strong-to-weak ExOPD: a Qwen3-1.7B student from a Qwen3-4B teacher (after RL), lambda = 1.25,
# pi_ref = the student's initial weights. The reward-correction variant (pi_ref = the teacher's
# pre-RL base) is exopd-qwen3-1.7b-reward-correction.sh.
#
#   slurm/submit.sh --dry-run examples/exopd-qwen3-1.7b-strong-to-weak.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/common.sh
source "$HERE/common.sh"
# shellcheck source=examples/models/qwen3-1.7b.sh
source "$HERE/models/qwen3-1.7b.sh"

ROLLOUT_MODEL=$HF/Qwen3-1.7B
ROLLOUT_GPUS_PER_SERVER=$MODEL_ROLLOUT_GPUS_PER_SERVER
ROLLOUT_SERVER_ARGS=(--mem-fraction-static 0.4 "${MODEL_ROLLOUT_SERVER_ARGS[@]}")

STRONG_TO_WEAK_ARGS=(
    "${PAPER_ARGS[@]}"
    "${MODEL_LAYOUT_ARGS[@]}"
    "${ROLLOUT_COLOCATE_ARGS[@]}"
    --student-load "$MCORE/Qwen3-1.7B"
    --teacher-load "$MCORE/Qwen3-4B-math-teacher"
    --gopd-lambda 1.25
    --prompt-data "$DATA/math-train.jsonl"
    --eval-prompt-data "$DATA/math-eval.jsonl"
    --train-iters 500
    --offload-frozen # teacher (and reference) wait in host memory between scoring passes
)
ARGS=("${STRONG_TO_WEAK_ARGS[@]}")
