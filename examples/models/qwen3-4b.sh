# shellcheck shell=bash
# shellcheck disable=SC2034  # read by the recipes that source this file
# Qwen3-4B (36 layers, hidden 2560, FFN 9728, 32 query / 8 KV heads of 128, tied embeddings).
# The architecture travels in the converted checkpoint (gopd_model.json), so nothing here repeats
# it: an architecture file says how to lay the model out for training and how to serve it.
MODEL_NAME=Qwen3-4B
# TP 2 keeps a 4B student + optimizer state + a 4B teacher and reference comfortably in 80 GB
MODEL_LAYOUT_ARGS=(
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 1
    --sequence-parallel # activations between layers split over TP: 8k-token responses fit
    --micro-batch-size 1
)
MODEL_ROLLOUT_GPUS_PER_SERVER=1 # SGLang --tp-size: 4B fits one GPU
MODEL_ROLLOUT_SERVER_ARGS=(--context-length 16384 --dtype bfloat16)
