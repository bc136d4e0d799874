# shellcheck shell=bash
# shellcheck disable=SC2034  # read by the recipes that source this file
# Qwen3-8B in Megatron-LM's flag names (from the HF config.json: 36 layers, hidden 4096,
# FFN 12288, 32 query heads / 8 KV groups of 128 channels, separate output layer, rope base 1e6).
# Converted checkpoints carry their architecture (gopd_model.json); these flags are for tools that
# want it spelled out, and the trainer checks them against the checkpoint.
MODEL_ARGS=(
    --num-layers 36
    --hidden-size 4096
    --ffn-hidden-size 12288
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --kv-channels 128
    --qk-layernorm
    --swiglu
    --normalization RMSNorm
    --norm-epsilon 1e-6
    --disable-bias-linear
    --position-embedding-type rope
    --rotary-base 1000000
    --vocab-size 151936
    --max-position-embeddings 40960
    --untie-embeddings-and-output-weights
)
