# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# ExOPD with two teachers: each prompt's "domain" routes it to its teacher (math or code), so one
# Qwen3-4B student learns from both domain experts; lambda = 1.25 for both.
#
#   slurm/submit.sh --dry-run examples/exopd-qwen3-4b-multi-teacher.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/exopd-qwen3-4b.sh
source "$HERE/exopd-qwen3-4b.sh"

ARGS=(
    "${PAPER_ARGS[@]}"
    "${MODEL_LAYOUT_ARGS[@]}"
    "${ROLLOUT_COLOCATE_ARGS[@]}"
    --student-load "$MCORE/Qwen3-4B"
    --teacher-load "math=$MCORE/Qwen3-4B-math-teacher"
    --teacher-load "code=$MCORE/Qwen3-4B-code-teacher"
    --gopd-lambda 1.25
    --prompt-data "$DATA/math-code-train.jsonl" # lines carry "domain": "math" | "code"
    --eval-prompt-data "$DATA/math-code-eval.jsonl"
    --train-iters 500
)
