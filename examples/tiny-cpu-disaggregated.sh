# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# The disaggregated layout of CI, for real on two CPU nodes: the rollout server (our CPU stand-in
# for SGLang) on a node of its own, the trainer on the other, the weights pushed after every step
# with --weight-sync distributed (gloo) across the nodes, and checked (--weight-sync-check).
#
#   python examples/tiny_cpu_prepare.py /tmp/tiny       # tiny models, checkpoints and prompts
#   slurm/submit.sh --site slurm/ci/site.sh --set TINY_DIR=/tmp/tiny examples/tiny-cpu-disaggregated.sh
TINY_DIR=${TINY_DIR:?set TINY_DIR to a directory made by examples/tiny_cpu_prepare.py}

NODES=1
GPUS_PER_NODE=0
NPROC_PER_NODE=1
TIME_LIMIT=10:00
TIME_LIMIT_WARNING=60
ROLLOUT_MODE=disaggregated
ROLLOUT_NODES=1
ROLLOUT_SERVERS_PER_NODE=1
ROLLOUT_ENGINE=cpu
ROLLOUT_MODEL=$TINY_DIR/hf/student # the servers start from it; the first push replaces it anyway
ROLLOUT_HEALTH_TIMEOUT=180
# fixed evaluation samples from their seeds (SGLang honours sampling seeds only with this)
ROLLOUT_SERVER_ARGS=(--enable-deterministic-inference)
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
    --rollout-engine external
    --weight-sync distributed
    --weight-sync-check
    --rollout-batch-size 8
    --n-samples-per-prompt 2
    --max-response-len 8
    --micro-batch-size 4
    --lr 3e-3
    --train-iters 3
    --save "$TINY_DIR/run-disaggregated"
    --load "$TINY_DIR/run-disaggregated"
    --exit-signal-handler
    --no-progress
)
