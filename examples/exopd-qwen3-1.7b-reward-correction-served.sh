# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# Strong-to-weak ExOPD with reward correction from a mixture-of-experts teacher served by SGLang:
# Qwen3-1.7B learns from Qwen3-30B-A3B (after RL), and the reference is the teacher's pre-RL base
# Qwen3-30B-A3B-Base, so the extrapolated reward log pi* - log pi_ref is the one the teacher's RL
# learned. Teacher and reference each run on an 8-GPU node of their own (2 SGLang servers of TP 4,
# EP 4 each); the trainer sends them the sampled token ids for prefill scoring (--teacher-urls,
# --ref-urls, filled in by the launcher) and never pushes weights to them. The student trains on
# one node, its rollout servers colocated. 3 nodes in all.
#
# Served roles score at temperature 1 (SGLang's prompt log-probs are untempered) with the sampled
# estimator: the paper's setting. The same run with the teacher hosted in Megatron is
# exopd-qwen3-1.7b-reward-correction-moe-hosted.sh; README "Large teachers" compares the two.
#
#   slurm/submit.sh --dry-run examples/exopd-qwen3-1.7b-reward-correction-served.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/common.sh
source "$HERE/common.sh"
# shellcheck source=examples/models/qwen3-1.7b.sh
source "$HERE/models/qwen3-1.7b.sh"
# shellcheck source=examples/models/qwen3-30b-a3b.sh
source "$HERE/models/qwen3-30b-a3b.sh"

NODES=1
ROLLOUT_MODEL=$HF/Qwen3-1.7B
ROLLOUT_GPUS_PER_SERVER=$MODEL_ROLLOUT_GPUS_PER_SERVER
ROLLOUT_SERVER_ARGS=(--mem-fraction-static 0.4 "${MODEL_ROLLOUT_SERVER_ARGS[@]}")

TEACHER_NODES=1
TEACHER_MODEL=$HF/Qwen3-30B-A3B
TEACHER_GPUS_PER_SERVER=$MOE_SERVED_GPUS_PER_SERVER
TEACHER_SERVER_ARGS=("${MOE_SERVED_SERVER_ARGS[@]}")
REF_NODES=1
REF_MODEL=$HF/Qwen3-30B-A3B-Base
REF_GPUS_PER_SERVER=$MOE_SERVED_GPUS_PER_SERVER
REF_SERVER_ARGS=("${MOE_SERVED_SERVER_ARGS[@]}")

ARGS=(
    "${PAPER_ARGS[@]}"
    # no frozen role on the student's GPUs: the 1.7B student needs no tensor parallelism
    # (~33 GB per GPU at TP 1 x DP 8, by the estimate gopd-train prints)
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 1
    --micro-batch-size 1
    "${ROLLOUT_COLOCATE_ARGS[@]}"
    --student-load "$MCORE/Qwen3-1.7B"
    --gopd-lambda 1.25
    --prompt-data "$DATA/math-train.jsonl"
    --eval-prompt-data "$DATA/math-eval.jsonl"
    --train-iters 500
    --served-sequences-per-request 16
)
