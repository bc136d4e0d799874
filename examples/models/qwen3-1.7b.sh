# shellcheck shell=bash
# shellcheck disable=SC2034  # read by the recipes that source this file
# Qwen3-1.7B (28 layers, hidden 2048, FFN 6144, 16 query / 8 KV heads of 128, tied embeddings).
# The architecture travels in the converted checkpoint; see qwen3-4b.sh.
MODEL_NAME=Qwen3-1.7B
# the student is small; the 4B teacher (and, with reward correction, the 4B reference) share its
# TP groups, so the layout is sized for them
MODEL_LAYOUT_ARGS=(
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 1
    --sequence-parallel # activations between layers split over TP: 8k-token responses fit
    --micro-batch-size 2
)
MODEL_ROLLOUT_GPUS_PER_SERVER=1
MODEL_ROLLOUT_SERVER_ARGS=(--context-length 16384 --dtype bfloat16)
