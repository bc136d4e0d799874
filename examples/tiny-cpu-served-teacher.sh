# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# A served teacher in CI, for real on two CPU nodes: the teacher's server (our CPU stand-in for
# SGLang, with its own API key) on a node of its own, the trainer on the other asking it for
# prefill log-probs (--teacher-urls, filled in by the launcher); the reference (lambda 1.25) is
# hosted in Megatron, the student's initial weights; the trainer starts its own rollout server.
#
#   python examples/tiny_cpu_prepare.py /tmp/tiny       # tiny models, checkpoints and prompts
#   slurm/submit.sh --site slurm/ci/site.sh --set TINY_DIR=/tmp/tiny examples/tiny-cpu-served-teacher.sh
TINY_DIR=${TINY_DIR:?set TINY_DIR to a directory made by examples/tiny_cpu_prepare.py}

NODES=1
GPUS_PER_NODE=0
NPROC_PER_NODE=1
TIME_LIMIT=10:00
TIME_LIMIT_WARNING=60
ROLLOUT_MODE=none # the trainer launches its CPU rollout server itself
ROLLOUT_ENGINE=cpu # the served teacher's server: the CPU stand-in, same flags as SGLang's
ROLLOUT_HEALTH_TIMEOUT=180
TEACHER_NODES=1
TEACHER_MODEL=$TINY_DIR/hf/teacher
TEACHER_GPUS_PER_SERVER=1
TEACHER_SERVERS_PER_NODE=1
ENTRY=(-m megatron_gopd.train)
ARGS=(
    --student-load "$TINY_DIR/student"
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
    --served-sequences-per-request 4
    --save "$TINY_DIR/run-served"
    --load "$TINY_DIR/run-served"
    --exit-signal-handler
    --no-progress
)
