# shellcheck shell=bash
# shellcheck disable=SC2034  # read by the recipes that source this file
# Qwen3-30B-A3B (and its pre-RL base Qwen3-30B-A3B-Base): mixture of experts, 48 layers, hidden
# 2048, 32 query / 4 KV heads of 128, 128 routed experts of FFN 768 per layer, top-8 routing with
# norm_topk_prob, no shared expert; 30.5B parameters (61 GB in bf16), 3.3B active per token.
# A frozen teacher or reference only (the student stays dense).
MOE_TEACHER_NAME=Qwen3-30B-A3B

# Served by SGLang (--teacher-urls / --ref-urls) on 8-GPU nodes: two servers of TP 4 per node,
# the experts split over the same 4 GPUs (EP 4): ~15 GB of weights per GPU, the rest KV cache for
# prefill. Two servers per node rather than one of TP 8: prefill scoring is throughput-bound and
# the model fits in 4 GPUs; DP over servers beats a wider TP.
MOE_SERVED_GPUS_PER_SERVER=4
MOE_SERVED_SERVER_ARGS=(
    --ep-size 4
    --context-length 16384
    --dtype bfloat16
    --mem-fraction-static 0.85
)

# Hosted in Megatron next to the student (--teacher-load / --ref-load): expert parallelism over
# the data-parallel ranks (EP must divide TP x DP / TP = DP). At TP 2 x DP 8 (two nodes), EP 8
# keeps 16 of the 128 experts per rank, their FFN split over TP: ~5.2 GB of weights per GPU per
# model (gopd-train prints the estimate of every role before it builds anything).
MOE_HOSTED_EP=8
