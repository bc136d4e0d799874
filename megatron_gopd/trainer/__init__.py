"""The G-OPD trainer: ``gopd-train`` (also ``python -m megatron_gopd.train``).

::

    driver         the loop: rollout -> teacher -> reference -> update -> sync -> save/eval/log
    stages         GOPDTrainer, the stages' state (models, optimizer, data, rollout side)
    config         TrainConfig: the components' configs composed, flags derived from them
    preflight      the checks that need files but no model (checkpoints, prompt data, routing)
    routing        domain -> teacher, reference (or none) and lambda
    data           prompt jsonl -> tokenized prompts, in a seeded, resumable order
    rollout_side   the servers, sampling and weight sync, bound to the trainer's config
    update         collation, the optimizer, one optimizer step through the pipeline schedule
    loss           the G-OPD loss in megatron-core's per-token-loss contract
    checkpointing  atomic, resumable training checkpoints
    tracking       timers, metric reduction, jsonl / TensorBoard / W&B sinks

Importing this package imports neither megatron nor transformers.
"""
