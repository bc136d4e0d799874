# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# The tiny CPU training run of CI: gopd-train (ExOPD, lambda 1.25) on two nodes, one rank each,
# gloo, tensor parallelism across the nodes; the trainer starts its own CPU rollout server.
#
#   python examples/tiny_cpu_prepare.py /tmp/tiny       # tiny models, checkpoints and prompts
#   slurm/submit.sh --site slurm/ci/site.sh --set TINY_DIR=/tmp/tiny examples/tiny-cpu-train.sh
TINY_DIR=${TINY_DIR:?set TINY_DIR to a directory made by examples/tiny_cpu_prepare.py}

NODES=2
GPUS_PER_NODE=0
NPROC_PER_NODE=1
TIME_LIMIT=10:00
TIME_LIMIT_WARNING=60
ROLLOUT_MODE=none # the trainer launches its CPU rollout server itself
ENTRY=(-m megatron_gopd.train)
ARGS=(
    --student-load "$TINY_DIR/student"
    --teacher-load "$TINY_DIR/teacher"
    --gopd-lambda 1.25
    --prompt-data "$TINY_DIR/train.jsonl"
    --eval-prompt-data "$TINY_DIR/eval.jsonl"
    --eval-interval 3
    --eval-grader exact
    --apply-chat-template
    --rollout-engine cpu
    --sglang-enable-deterministic-inference # fixed evaluation samples from their seeds
    --rollout-batch-size 8
    --n-samples-per-prompt 2
    --max-response-len 8
    --micro-batch-size 4
    --lr 3e-3
    --train-iters 3
    --tensor-model-parallel-size 2
    --save "$TINY_DIR/run"
    --load "$TINY_DIR/run"
    --exit-signal-handler
    --no-progress
)
