# shellcheck shell=bash
# shellcheck disable=SC2034  # read by the recipes that source this file
# Qwen3-1.7B in Megatron-LM's flag names (from the HF config.json: 28 layers, hidden 2048,
# FFN 6144, 16 query heads / 8 KV groups of 128 channels, tied embeddings, rope base 1e6).
# Converted checkpoints carry their architecture (gopd_model.json); these flags are for tools that
# want it spelled out, and the trainer checks them against the checkpoint.
MODEL_ARGS=(
    --num-layers 28
    --hidden-size 2048
    --ffn-hidden-size 6144
    --num-attention-heads 16
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
)
