# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# G-OPD: a Qwen3-4B student distilled on-policy from a Qwen3-8B teacher on math prompts.
# 4 nodes x 8 GPUs; the SGLang rollout servers share the training GPUs (colocated): 4 servers of
# TP=2 per node, which the trainer puts to sleep while it trains and wakes for rollouts.
#
#   slurm/submit.sh --dry-run examples/gopd-qwen3-4b-colocated.sh   # every node's commands
#   slurm/submit.sh examples/gopd-qwen3-4b-colocated.sh             # submit
#
# Lines marked TODO(trainer) name flags of gopd-train that are still being written.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/models/qwen3-4b.sh
source "$HERE/models/qwen3-4b.sh"
STUDENT_ARGS=("${MODEL_ARGS[@]}")
# shellcheck source=examples/models/qwen3-8b.sh
source "$HERE/models/qwen3-8b.sh"
TEACHER_ARGS=("${MODEL_ARGS[@]}")

# Where HF models, converted checkpoints, data and runs live (shared by all nodes).
GOPD_HOME=${GOPD_HOME:-$HOME/gopd}
STUDENT_HF=$GOPD_HOME/hf/Qwen3-4B                # HF format: the rollout servers start from it
STUDENT_MCORE=$GOPD_HOME/mcore/Qwen3-4B          # tools/convert_hf_to_megatron.py output
TEACHER_MCORE=$GOPD_HOME/mcore/Qwen3-8B
PROMPTS=$GOPD_HOME/data/math-train.jsonl
# --load and --save point at the same run directory: a requeued (preempted or timed-out) job
# resumes where it stopped.
RUN_DIR=$GOPD_HOME/runs/$JOB_NAME

NODES=4
GPUS_PER_NODE=8
TIME_LIMIT=24:00:00
ENTRY=(-m megatron_gopd.train)

ROLLOUT_MODE=colocated
ROLLOUT_MODEL=$STUDENT_HF
ROLLOUT_GPUS_PER_SERVER=2
ROLLOUT_SERVER_ARGS=(
    # leaves room for Megatron's weights and optimizer state before the first release
    --mem-fraction-static 0.5
    --context-length 16384
    --dtype bfloat16
)

ARGS=(
    "${STUDENT_ARGS[@]}"
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 1
    --sequence-parallel
    --use-distributed-optimizer
    --bf16
    --micro-batch-size 1
    --global-batch-size 256
    --seq-length 16384
    --lr 1e-6
    --train-iters 500
    --load "$RUN_DIR"                          # the run's own checkpoints: a requeued job resumes
    --save "$RUN_DIR"
    --pretrained-checkpoint "$STUDENT_MCORE"   # TODO(trainer): the start while $RUN_DIR is empty
    --save-interval 20
    --exit-signal-handler                      # checkpoint and exit on SIGTERM (time limit, preemption)
    --teacher-load "$TEACHER_MCORE"            # TODO(trainer)
    --prompt-data "$PROMPTS"                   # TODO(trainer)
    --gopd-lambda 1.0                          # TODO(trainer): reward-extrapolation factor
    --rollout-n-samples 8                      # TODO(trainer)
    --rollout-colocate                         # TODO(trainer): release/resume the servers' memory
)
