# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# The tiny CPU run of CI: two nodes, one rank each, gloo, tensor parallelism across the nodes.
# It scores token sequences with gopd-score under a tiny converted model (TP=2 forward passes).
#
#   python examples/tiny_cpu_prepare.py /tmp/tiny       # tiny HF model -> converted checkpoint
#   slurm/submit.sh --site slurm/ci/site.sh --set TINY_DIR=/tmp/tiny examples/tiny-cpu-score.sh
TINY_DIR=${TINY_DIR:?set TINY_DIR to a directory made by examples/tiny_cpu_prepare.py}

NODES=2
GPUS_PER_NODE=0
NPROC_PER_NODE=1
TIME_LIMIT=10:00
TIME_LIMIT_WARNING=60
ROLLOUT_MODE=none
ENTRY=(-m megatron_gopd.scoring)
ARGS=(
    --load "$TINY_DIR/mcore"
    --input "$TINY_DIR/tokens.jsonl"
    --output "$TINY_DIR/logprobs.jsonl"
    --tensor-model-parallel-size 2
)
