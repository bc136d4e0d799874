# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# ExOPD, single teacher: a Qwen3-4B-Non-thinking student distilled on-policy from a math teacher
# (Qwen3-4B-Non-thinking after math RL), lambda = 1.25 (reward extrapolation: the student may pass
# its teacher); pi_ref = the student's initial weights (the default).
#
#   slurm/submit.sh --dry-run examples/exopd-qwen3-4b.sh   # every node's commands
#   slurm/submit.sh examples/exopd-qwen3-4b.sh             # submit
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/common.sh
source "$HERE/common.sh"
# shellcheck source=examples/models/qwen3-4b.sh
source "$HERE/models/qwen3-4b.sh"

ROLLOUT_MODEL=$HF/Qwen3-4B
ROLLOUT_GPUS_PER_SERVER=$MODEL_ROLLOUT_GPUS_PER_SERVER
# leaves room for Megatron's models and optimizer state before the first release
ROLLOUT_SERVER_ARGS=(--mem-fraction-static 0.5 "${MODEL_ROLLOUT_SERVER_ARGS[@]}")

ARGS=(
    "${PAPER_ARGS[@]}"
    "${MODEL_LAYOUT_ARGS[@]}"
    "${ROLLOUT_COLOCATE_ARGS[@]}"
    --student-load "$MCORE/Qwen3-4B"
    --teacher-load "$MCORE/Qwen3-4B-math-teacher"
    --gopd-lambda 1.25
    --prompt-data "$DATA/math-train.jsonl"
    --eval-prompt-data "$DATA/math-eval.jsonl"
    --train-iters 500
)
