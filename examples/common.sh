# shellcheck shell=bash
# shellcheck disable=SC2034  # read by the recipes that source this file
# What every paper recipe shares: where things live, and the paper's G-OPD training settings.
#
# The paper (arXiv 2602.12125): Qwen3 non-thinking models, constant learning rate 1e-5, rollout
# temperature 1.0, one on-policy update per rollout batch (our default: --global-batch-size is the
# whole rollout batch). The batch sizes and lengths below are ours, not the paper's.

# Where HF models, converted checkpoints, data and runs live (a directory all nodes see).
GOPD_HOME=${GOPD_HOME:-$HOME/gopd}
HF=$GOPD_HOME/hf       # HF directories (the rollout servers load the student's)
MCORE=$GOPD_HOME/mcore # tools/convert_hf_to_megatron.py outputs
DATA=$GOPD_HOME/data   # prompt jsonl files ("prompt" or "messages", optional "domain")
# --load and --save point at the run's own directory: a requeued (preempted, timed-out) job
# resumes where it stopped, and the first run (nothing there yet) starts from --student-load.
RUN_DIR=$GOPD_HOME/runs/$JOB_NAME

NODES=4
GPUS_PER_NODE=8
TIME_LIMIT=24:00:00
ENTRY=(-m megatron_gopd.train)

PAPER_ARGS=(
    --lr 1e-5
    --lr-decay-style constant
    --rollout-temperature 1.0
    --apply-chat-template
    --chat-template-kwargs '{"enable_thinking": false}' # Qwen3 non-thinking mode
    --rollout-batch-size 64
    --n-samples-per-prompt 8
    --max-response-len 8192
    --bf16
    --use-distributed-optimizer
    --clip-grad 1.0
    --load "$RUN_DIR"
    --save "$RUN_DIR"
    --save-interval 20
    --exit-signal-handler # checkpoint and stop on SIGTERM (time limit, preemption)
    --eval-interval 20
    --wandb-mode offline
)

# Rollouts colocated with training by default: SGLang servers on every training node share its
# GPUs; the trainer releases their memory while it trains.
ROLLOUT_MODE=colocated
ROLLOUT_COLOCATE_ARGS=(--rollout-engine external --rollout-colocate)
