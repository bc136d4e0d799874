# shellcheck shell=bash
# The environment every node runs with: the one place for settings the stack needs, each with the
# reason it is there. node.sh exports these before it starts anything; the dry run prints them.
# A site adds or overrides entries with SITE_ENV in its site config (applied last).

# Fills GOPD_ENV with NAME=VALUE entries. Reads the loaded site config, recipe and plan.
gopd_env_settings() {
    GOPD_ENV=()

    # The checkout that launched the job is the code that runs, even where another copy of the
    # package is installed on the nodes (or in the container).
    GOPD_ENV+=("PYTHONPATH=$GOPD_ROOT${PYTHONPATH:+:$PYTHONPATH}")

    # Per-node logs show output as it happens, and nothing is lost in a buffer when Slurm kills
    # a node's processes after a failure elsewhere.
    GOPD_ENV+=(PYTHONUNBUFFERED=1)

    # Megatron-core issues the tensor-parallel all-gather / reduce-scatter of the backward pass
    # asynchronously and relies on a single GPU work queue to run them before the weight-gradient
    # GEMM they overlap with (megatron/core/tensor_parallel/layers.py); Megatron-LM refuses
    # --sequence-parallel without it. SGLang sets its own value (4) in its processes, so this
    # does not slow the rollout servers.
    GOPD_ENV+=(CUDA_DEVICE_MAX_CONNECTIONS=1)

    # SGLang turns NCCL's cuMem allocator off in its processes (NCCL_CUMEM_ENABLE=0 unless
    # --enable-symm-mem), and weight sync puts trainer ranks and SGLang ranks in one NCCL group
    # (/init_weights_update_group): both sides must use the same setting, or NCCL fails to set up
    # or hangs (vllm-project/vllm#24141 makes the same point for vLLM). cuMem also costs extra
    # memory under CUDA graphs in NCCL 2.19-2.21 (NVIDIA/nccl#1234), which colocated servers
    # cannot spare. Set in every mode: with ROLLOUT_MODE=none the trainer may start SGLang itself.
    GOPD_ENV+=(NCCL_CUMEM_ENABLE=0)

    # Requests to the rollout servers (and torchrun's store) must not go through a site HTTP
    # proxy that knows nothing of the compute nodes.
    local no_proxy=localhost,127.0.0.1 addr
    for addr in "${GOPD_ADDRS[@]}"; do no_proxy+=",$addr"; done
    [[ -n ${NO_PROXY:-} ]] && no_proxy+=",$NO_PROXY"
    GOPD_ENV+=("NO_PROXY=$no_proxy" "no_proxy=$no_proxy")

    # HF tokenizers start a thread pool; forked data-loader workers then deadlock or warn.
    GOPD_ENV+=(TOKENIZERS_PARALLELISM=false)

    # Which network interface NCCL's bootstrap and gloo (Megatron's CPU groups, our CPU runs)
    # use: the default picks the first interface up, often a management network or docker0.
    if [[ -n $SITE_SOCKET_IFNAME ]]; then
        GOPD_ENV+=("NCCL_SOCKET_IFNAME=$SITE_SOCKET_IFNAME" "GLOO_SOCKET_IFNAME=$SITE_SOCKET_IFNAME")
    fi

    # The site's own settings (InfiniBand HCAs, GID index, debug levels...), last so they win.
    GOPD_ENV+=("${SITE_ENV[@]}")
}
