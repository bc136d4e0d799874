# shellcheck shell=bash
# The launcher's logic, shared by slurm/submit.sh (submit host), slurm/gopd.sbatch (batch step) and
# slurm/node.sh (one task per node): read the site config and the recipe, decide which node runs
# what, and build the exact commands. The dry run prints what the real run executes because both
# go through the same functions here (gopd_node_main runs or prints, depending on DRY_RUN).
#
# Command line shared by the three entry points:
#   [--dry-run] [--site FILE] [--set NAME=VALUE]... RECIPE [ARG...]
# ARGs are appended to the recipe's ARGS (the entry point's arguments).
#
# Names: SITE_* come from the site config, the plain upper-case knobs (NODES, ENTRY, ARGS,
# ROLLOUT_*) from the recipe, GOPD_* are the launcher's own state (also exported to node.sh).

GOPD_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GOPD_ROOT=${GOPD_ROOT:-$(dirname "$GOPD_LIB_DIR")}
# shellcheck source=slurm/env.sh
source "$GOPD_LIB_DIR/env.sh"

gopd_log() { printf '[gopd %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
gopd_die() {
    gopd_log "error: $*"
    exit 2
}

# ------------------------------------------------------------------------------ command line

gopd_usage() {
    cat >&2 <<EOF
usage: ${0##*/} [--dry-run] [--site FILE] [--set NAME=VALUE]... RECIPE [ARG...]

  RECIPE            bash file setting NODES, ENTRY, ARGS, ROLLOUT_* (see examples/)
  ARG...            appended to the recipe's ARGS (the arguments of its entry point)
  --dry-run         print the commands every node would run; start nothing
  --site FILE       site config (default: \$GOPD_SITE or slurm/site.sh)
  --set NAME=VALUE  set a knob before the recipe is read and again after it, so it wins
EOF
}

# Sets DRY_RUN, GOPD_SITE_FILE, GOPD_SETS, GOPD_RECIPE, GOPD_EXTRA_ARGS and GOPD_CLI (the
# normalized arguments, forwarded from submit.sh to the batch script and from there to node.sh).
gopd_parse_args() {
    DRY_RUN=0
    GOPD_SITE_FILE=${GOPD_SITE:-$GOPD_LIB_DIR/site.sh}
    GOPD_SETS=()
    while (($#)); do
        case $1 in
            --dry-run) DRY_RUN=1 ;;
            --site)
                (($# >= 2)) || gopd_die "--site needs a file"
                GOPD_SITE_FILE=$2
                shift
                ;;
            --set)
                (($# >= 2)) || gopd_die "--set needs NAME=VALUE"
                [[ $2 =~ ^[A-Z_][A-Z0-9_]*= ]] || gopd_die "--set $2: expected NAME=VALUE"
                GOPD_SETS+=("$2")
                shift
                ;;
            -h | --help)
                gopd_usage
                exit 0
                ;;
            --) ;;
            -*) gopd_die "unknown option $1 (options go before the recipe)" ;;
            *) break ;;
        esac
        shift
    done
    (($#)) || {
        gopd_usage
        exit 2
    }
    GOPD_RECIPE=$(gopd_abspath "$1")
    shift
    GOPD_EXTRA_ARGS=("$@")
    [[ -f $GOPD_RECIPE ]] || gopd_die "recipe $GOPD_RECIPE not found"
    GOPD_SITE_FILE=$(gopd_abspath "$GOPD_SITE_FILE")
    [[ -f $GOPD_SITE_FILE ]] || gopd_die "site config $GOPD_SITE_FILE not found"
    GOPD_CLI=(--site "$GOPD_SITE_FILE")
    local s
    for s in "${GOPD_SETS[@]}"; do GOPD_CLI+=(--set "$s"); done
    GOPD_CLI+=("$GOPD_RECIPE" "${GOPD_EXTRA_ARGS[@]}")
}

gopd_abspath() {
    if [[ $1 == /* ]]; then printf '%s\n' "$1"; else printf '%s/%s\n' "$PWD" "$1"; fi
}

# ------------------------------------------------------------------------------ configuration

gopd_defaults() {
    # site (slurm/site.sh documents each)
    SITE_PARTITION=""
    SITE_ACCOUNT=""
    SITE_QOS=""
    SITE_GPU_REQUEST=gpus-per-node
    SITE_SBATCH_ARGS=()
    SITE_SRUN_ARGS=()
    SITE_CONTAINER_IMAGE=""
    SITE_CONTAINER_MOUNTS=""
    SITE_CONTAINER_ARGS=()
    SITE_MODULES=()
    SITE_SETUP=""
    SITE_PYTHON=python3
    SITE_SOCKET_IFNAME=""
    SITE_ENV=()
    SITE_SHARED_HOST_PORT_OFFSET=0
    # recipe (examples/README.md documents each)
    JOB_NAME=$(basename "$GOPD_RECIPE" .sh)
    NODES=1
    GPUS_PER_NODE=8
    NPROC_PER_NODE=""
    TIME_LIMIT=""
    ENTRY=()
    ARGS=()
    TORCHRUN_ARGS=()
    MASTER_PORT=""
    LOG_ROOT=""
    REQUEUE=1
    # shellcheck disable=SC2034  # read by gopd.sbatch
    MAX_REQUEUES=20
    TIME_LIMIT_WARNING=300
    STOP_SIGNAL=TERM
    ROLLOUT_MODE=none
    ROLLOUT_NODES=0
    ROLLOUT_MODEL=""
    ROLLOUT_GPUS_PER_SERVER=1
    ROLLOUT_SERVERS_PER_NODE=""
    ROLLOUT_SERVER_ARGS=()
    ROLLOUT_PORT=30000
    ROLLOUT_PORT_STRIDE=10
    ROLLOUT_HEALTH_PATH=/health_generate
    ROLLOUT_HEALTH_TIMEOUT=1800
    ROLLOUT_URLS_FLAG=--rollout-urls
    ROLLOUT_ENGINE=sglang
    ROLLOUT_AUTH=1
    # A teacher and a reference served by SGLang on nodes of their own (the trainer gets
    # --teacher-urls / --ref-urls); these nodes follow the rollout nodes in the allocation
    TEACHER_NODES=0
    TEACHER_MODEL=""
    TEACHER_GPUS_PER_SERVER=8
    TEACHER_SERVERS_PER_NODE=""
    TEACHER_SERVER_ARGS=()
    TEACHER_PORT=31000
    TEACHER_DOMAIN=""
    REF_NODES=0
    REF_MODEL=""
    REF_GPUS_PER_SERVER=8
    REF_SERVERS_PER_NODE=""
    REF_SERVER_ARGS=()
    REF_PORT=32000
    REF_DOMAIN=""
}

gopd_apply_sets() {
    local s
    for s in "${GOPD_SETS[@]}"; do printf -v "${s%%=*}" '%s' "${s#*=}"; done
}

# Defaults, then the site config, then the recipe; --set values before and after each.
gopd_load() {
    gopd_defaults
    gopd_apply_sets
    # shellcheck source=slurm/site.sh
    source "$GOPD_SITE_FILE"
    gopd_apply_sets
    # shellcheck disable=SC1090
    source "$GOPD_RECIPE"
    gopd_apply_sets
    ARGS+=("${GOPD_EXTRA_ARGS[@]}")
    gopd_validate
    # relative to where the job was submitted from, on the submit host and inside the job alike
    LOG_ROOT=${LOG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}/logs}
}

gopd_is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# Seconds in a Slurm time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
gopd_time_seconds() {
    local t=$1 days=0 a b c
    if [[ $t =~ ^([0-9]+)-(.*)$ ]]; then
        days=${BASH_REMATCH[1]}
        t=${BASH_REMATCH[2]}
        IFS=: read -r a b c <<<"$t"
        printf '%d\n' $((10#$days * 86400 + 10#${a:-0} * 3600 + 10#${b:-0} * 60 + 10#${c:-0}))
        return
    fi
    [[ $t =~ ^[0-9]+(:[0-9]+){0,2}$ ]] || return 1
    IFS=: read -r a b c <<<"$t"
    if [[ -n $c ]]; then
        printf '%d\n' $((10#$a * 3600 + 10#$b * 60 + 10#$c))
    else
        printf '%d\n' $((10#$a * 60 + 10#${b:-0}))
    fi
}

gopd_validate() {
    ((${#ENTRY[@]})) || gopd_die "$GOPD_RECIPE sets no ENTRY (e.g. ENTRY=(-m megatron_gopd.train))"
    local v
    for v in NODES GPUS_PER_NODE ROLLOUT_NODES ROLLOUT_GPUS_PER_SERVER ROLLOUT_PORT \
        ROLLOUT_PORT_STRIDE ROLLOUT_HEALTH_TIMEOUT MAX_REQUEUES TIME_LIMIT_WARNING \
        SITE_SHARED_HOST_PORT_OFFSET ROLLOUT_AUTH TEACHER_NODES TEACHER_GPUS_PER_SERVER \
        TEACHER_PORT REF_NODES REF_GPUS_PER_SERVER REF_PORT; do
        gopd_is_uint "${!v}" || gopd_die "$v=${!v}: expected a non-negative integer"
    done
    ((NODES >= 1)) || gopd_die "NODES must be at least 1"
    if [[ -z $NPROC_PER_NODE ]]; then
        NPROC_PER_NODE=$((GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1))
    fi
    if ! gopd_is_uint "$NPROC_PER_NODE" || ((NPROC_PER_NODE < 1)); then
        gopd_die "NPROC_PER_NODE=$NPROC_PER_NODE: expected a positive integer"
    fi
    if [[ -n $TIME_LIMIT ]]; then
        local limit
        limit=$(gopd_time_seconds "$TIME_LIMIT") || gopd_die "TIME_LIMIT=$TIME_LIMIT: not a Slurm time"
        # the warning would arrive at once and stop the run before it did anything
        ((limit > 2 * TIME_LIMIT_WARNING)) || gopd_die "TIME_LIMIT=$TIME_LIMIT leaves no time" \
            "before the checkpoint warning TIME_LIMIT_WARNING=$TIME_LIMIT_WARNING s: lower the latter"
    fi
    case $SITE_GPU_REQUEST in gpus-per-node | gres | none) ;;
        *) gopd_die "SITE_GPU_REQUEST=$SITE_GPU_REQUEST: expected gpus-per-node, gres or none" ;;
    esac
    case $ROLLOUT_MODE in
        none)
            ROLLOUT_NODES=0
            ROLLOUT_SERVERS_PER_NODE=0
            ;;
        colocated | disaggregated)
            ((ROLLOUT_GPUS_PER_SERVER >= 1)) || gopd_die "ROLLOUT_GPUS_PER_SERVER must be >= 1"
            if [[ -z $ROLLOUT_SERVERS_PER_NODE ]]; then
                ((GPUS_PER_NODE % ROLLOUT_GPUS_PER_SERVER == 0)) || gopd_die \
                    "GPUS_PER_NODE=$GPUS_PER_NODE is not a multiple of ROLLOUT_GPUS_PER_SERVER=$ROLLOUT_GPUS_PER_SERVER"
                ROLLOUT_SERVERS_PER_NODE=$((GPUS_PER_NODE / ROLLOUT_GPUS_PER_SERVER))
            fi
            if ! gopd_is_uint "$ROLLOUT_SERVERS_PER_NODE" || ((ROLLOUT_SERVERS_PER_NODE < 1)); then
                gopd_die "ROLLOUT_MODE=$ROLLOUT_MODE needs at least one server per node (GPUS_PER_NODE=$GPUS_PER_NODE)"
            fi
            if [[ $ROLLOUT_MODE == colocated ]]; then
                ROLLOUT_NODES=0
            else
                ((ROLLOUT_NODES >= 1)) || gopd_die "ROLLOUT_MODE=disaggregated needs ROLLOUT_NODES >= 1"
            fi
            ;;
        *) gopd_die "ROLLOUT_MODE=$ROLLOUT_MODE: expected none, colocated or disaggregated" ;;
    esac
    case $ROLLOUT_ENGINE in sglang | cpu) ;;
        *) gopd_die "ROLLOUT_ENGINE=$ROLLOUT_ENGINE: expected sglang or cpu" ;;
    esac
    local kind n_var g_var m_var s_var
    for kind in TEACHER REF; do
        n_var=${kind}_NODES g_var=${kind}_GPUS_PER_SERVER m_var=${kind}_MODEL
        s_var=${kind}_SERVERS_PER_NODE
        ((${!n_var})) || continue
        [[ -n ${!m_var} ]] || gopd_die "$n_var=${!n_var}: set $m_var (the HF directory its servers load)"
        ((${!g_var} >= 1)) || gopd_die "$g_var=${!g_var} must be >= 1"
        if [[ -z ${!s_var} ]]; then
            ((GPUS_PER_NODE % ${!g_var} == 0)) || gopd_die \
                "$g_var=${!g_var} must divide GPUS_PER_NODE=$GPUS_PER_NODE"
            printf -v "$s_var" '%d' $((GPUS_PER_NODE / ${!g_var}))
        fi
        if ! gopd_is_uint "${!s_var}" || ((${!s_var} < 1)); then
            gopd_die "$n_var=${!n_var} needs at least one server per node ($s_var=${!s_var})"
        fi
    done
    gopd_validate_trainer
    return 0
}

# The value of FLAG in the recipe's ARGS (the last one wins, as in argparse), or DEFAULT.
gopd_arg_value() {
    local flag=$1 default=$2 i value=$2
    for ((i = 0; i < ${#ARGS[@]}; i++)); do
        [[ ${ARGS[i]} == "$flag" ]] && value=${ARGS[i + 1]:-$default}
    done
    printf '%s\n' "$value"
}

gopd_has_arg() {
    local a
    for a in "${ARGS[@]}"; do [[ $a == "$1" ]] && return 0; done
    return 1
}

gopd_is_trainer() { [[ "${ENTRY[*]}" == "-m megatron_gopd.train" ]]; }

# The transport --weight-sync resolves to in the trainer (auto: tensor when colocated).
gopd_weight_sync() {
    local ws
    ws=$(gopd_arg_value --weight-sync auto)
    if [[ $ws == auto ]]; then
        if gopd_has_arg --rollout-colocate; then ws=tensor; else ws=distributed; fi
    fi
    printf '%s\n' "$ws"
}

# What the trainer would refuse after its models are built, refused before anything is submitted.
gopd_validate_trainer() {
    gopd_is_trainer || return 0
    case $ROLLOUT_MODE in
        colocated)
            gopd_has_arg --rollout-colocate || gopd_die "ROLLOUT_MODE=colocated: the trainer" \
                "needs --rollout-colocate in ARGS (it releases the servers' memory while it trains)"
            [[ $(gopd_weight_sync) != distributed ]] || gopd_die "ROLLOUT_MODE=colocated with" \
                "--weight-sync distributed: NCCL refuses a trainer rank and a server rank on one GPU;" \
                "colocated servers take --weight-sync tensor (CUDA IPC, what auto picks)"
            ((ROLLOUT_SERVERS_PER_NODE * ROLLOUT_GPUS_PER_SERVER == NPROC_PER_NODE)) || gopd_die \
                "ROLLOUT_MODE=colocated: $ROLLOUT_SERVERS_PER_NODE server(s) x $ROLLOUT_GPUS_PER_SERVER" \
                "GPU(s) per node must cover the NPROC_PER_NODE=$NPROC_PER_NODE trainer GPUs (each server" \
                "TP rank gets its weights from the trainer rank on its GPU)"
            ;;
        disaggregated)
            ! gopd_has_arg --rollout-colocate || gopd_die "ROLLOUT_MODE=disaggregated: drop" \
                "--rollout-colocate from ARGS (the servers have nodes of their own)"
            [[ $(gopd_weight_sync) != tensor ]] || gopd_die "ROLLOUT_MODE=disaggregated with" \
                "--weight-sync tensor: CUDA IPC handles open only on their own node"
            ;;
        *) ;;
    esac
    return 0
}

# ------------------------------------------------------------------------------ the plan

# Fills GOPD_HOSTS (every node of the allocation, in order: training nodes first, then rollout
# nodes), GOPD_ADDRS (how other nodes reach each one), GOPD_JOB_ID, MASTER_ADDR, MASTER_PORT,
# GOPD_LOG_DIR and GOPD_ROLLOUT_URLS. node.sh gets the first three from the batch step through the
# environment: inside a container there is no scontrol to ask.
gopd_plan() {
    local total=$((NODES + ROLLOUT_NODES + TEACHER_NODES + REF_NODES)) i
    GOPD_SIMULATED=0
    if [[ -n ${GOPD_PLAN_HOSTS:-} ]]; then
        read -r -a GOPD_HOSTS <<<"$GOPD_PLAN_HOSTS"
        read -r -a GOPD_ADDRS <<<"$GOPD_PLAN_ADDRS"
        GOPD_JOB_ID=$GOPD_PLAN_JOB_ID
    elif [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
        mapfile -t GOPD_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
        GOPD_ADDRS=()
        for i in "${!GOPD_HOSTS[@]}"; do GOPD_ADDRS+=("$(gopd_node_addr "${GOPD_HOSTS[i]}")"); done
        GOPD_JOB_ID=${SLURM_JOB_ID:?}
    elif ((DRY_RUN)); then
        # outside an allocation: stand-in names, so the dry run works on any machine
        GOPD_SIMULATED=1
        GOPD_HOSTS=()
        for ((i = 1; i <= total; i++)); do GOPD_HOSTS+=("$(printf 'node%03d' "$i")"); done
        GOPD_ADDRS=("${GOPD_HOSTS[@]}")
        GOPD_JOB_ID=0
    else
        gopd_die "not inside a Slurm job (no SLURM_JOB_NODELIST): submit with slurm/submit.sh, or use --dry-run"
    fi
    ((${#GOPD_HOSTS[@]} >= total)) || gopd_die "the allocation has ${#GOPD_HOSTS[@]} node(s);" \
        "the recipe needs NODES=$NODES + ROLLOUT_NODES=$ROLLOUT_NODES + TEACHER_NODES=$TEACHER_NODES" \
        "+ REF_NODES=$REF_NODES = $total"
    MASTER_ADDR=${GOPD_ADDRS[0]}
    # distinct per job, so two jobs sharing a node do not collide; below the ephemeral range
    MASTER_PORT=${MASTER_PORT:-$((20000 + GOPD_JOB_ID % 10000))}
    GOPD_LOG_DIR=$LOG_ROOT/$JOB_NAME-$GOPD_JOB_ID
    GOPD_ROLLOUT_URLS=()
    local n j
    for n in $(gopd_server_nodes); do
        for ((j = 0; j < ROLLOUT_SERVERS_PER_NODE; j++)); do
            GOPD_ROLLOUT_URLS+=("http://${GOPD_ADDRS[n]}:$(gopd_server_port "$n" "$j")")
        done
    done
    GOPD_TEACHER_URLS=()
    GOPD_REF_URLS=()
    for n in $(gopd_served_nodes teacher); do
        for ((j = 0; j < TEACHER_SERVERS_PER_NODE; j++)); do
            GOPD_TEACHER_URLS+=("http://${GOPD_ADDRS[n]}:$(gopd_served_port teacher "$n" "$j")")
        done
    done
    for n in $(gopd_served_nodes ref); do
        for ((j = 0; j < REF_SERVERS_PER_NODE; j++)); do
            GOPD_REF_URLS+=("http://${GOPD_ADDRS[n]}:$(gopd_served_port ref "$n" "$j")")
        done
    done
}

# Nodes after the training nodes that run servers (the rollout step): rollout, teacher, reference.
gopd_server_step_nodes() { printf '%d\n' $((ROLLOUT_NODES + TEACHER_NODES + REF_NODES)); }

# What node INDEX runs: train, rollout, teacher or ref.
gopd_node_kind() {
    local idx=$1
    if ((idx < NODES)); then
        echo train
    elif ((idx < NODES + ROLLOUT_NODES)); then
        echo rollout
    elif ((idx < NODES + ROLLOUT_NODES + TEACHER_NODES)); then
        echo teacher
    else
        echo ref
    fi
}

# Indices (into GOPD_HOSTS) of the nodes serving KIND (teacher or ref).
gopd_served_nodes() {
    local first=$((NODES + ROLLOUT_NODES)) count=$TEACHER_NODES
    if [[ $1 == ref ]]; then
        first=$((first + TEACHER_NODES)) count=$REF_NODES
    fi
    ((count)) || return 0
    seq "$first" $((first + count - 1))
}

gopd_served_port() {
    local base=$TEACHER_PORT
    [[ $1 == ref ]] && base=$REF_PORT
    printf '%d\n' $((base + $3 * ROLLOUT_PORT_STRIDE + $2 * SITE_SHARED_HOST_PORT_OFFSET))
}

# The address other nodes use for HOST: the name itself when it resolves, else the NodeAddr
# Slurm knows it by (emulated test nodes share one host and have names nothing else resolves).
gopd_node_addr() {
    local host=$1 addr
    if getent hosts "$host" >/dev/null 2>&1; then
        printf '%s\n' "$host"
        return
    fi
    addr=$(scontrol show node -o "$host" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    printf '%s\n' "${addr:-$host}"
}

# Indices (into GOPD_HOSTS) of the nodes that run rollout servers.
gopd_server_nodes() {
    case $ROLLOUT_MODE in
        colocated) seq 0 $((NODES - 1)) ;;
        disaggregated) seq "$NODES" $((NODES + ROLLOUT_NODES - 1)) ;;
        *) ;;
    esac
}

gopd_server_port() {
    local node=$1 j=$2
    printf '%d\n' $((ROLLOUT_PORT + j * ROLLOUT_PORT_STRIDE + node * SITE_SHARED_HOST_PORT_OFFSET))
}

# ------------------------------------------------------------------------------ commands

# The file holding the API key of rollout server J on node NODE (SGLang's --config YAML): on the
# node's own disk, mode 600, removed when the node's task ends; a key on a command line would be
# readable by every user of the node.
gopd_server_auth_file() {
    printf '%s/gopd-%s-node%s-server%s.yaml\n' "${TMPDIR:-/tmp}" "$GOPD_JOB_ID" "$1" "$2"
}

# The command of rollout server J on node NODE, listening on PORT, into the array CMD.
# A recipe may redefine this function (after the library is loaded, recipes are sourced),
# e.g. to start another server, or the trainer's own launcher.
rollout_server_command() {
    local node=$1 j=$2 port=$3 module=sglang.launch_server
    [[ $ROLLOUT_ENGINE == cpu ]] && module=megatron_gopd.cpu_server # the CPU stand-in (CI)
    CMD=("$SITE_PYTHON" -m "$module"
        --model-path "${ROLLOUT_MODEL:?the recipe must set ROLLOUT_MODEL (an HF model directory)}"
        --host 0.0.0.0 --port "$port"
        # explicit: SGLang otherwise picks port+random for NCCL, racing its neighbours on the node
        --nccl-port $((port + 1))
        --tp-size "$ROLLOUT_GPUS_PER_SERVER" --base-gpu-id $((j * ROLLOUT_GPUS_PER_SERVER))
        # fp32 logits, as the trainer computes its log-probs (a bf16 LM head rounds them)
        --enable-fp32-lm-head)
    if [[ $ROLLOUT_MODE == colocated ]]; then
        # lets the trainer free the servers' weights and KV cache during training
        # (/release_memory_occupation) and take them back for rollouts (/resume_memory_occupation)
        CMD+=(--enable-memory-saver)
    fi
    if ((ROLLOUT_AUTH)); then
        # --api-key GOPD_ROLLOUT_API_KEY, from a file only this user can read
        CMD+=(--config "$(gopd_server_auth_file "$node" "$j")")
    fi
    CMD+=("${ROLLOUT_SERVER_ARGS[@]}")
}

# The command of server J of the served KIND (teacher or ref) on node NODE, listening on PORT,
# into the array CMD: prefill scoring only (no weight updates, no memory release), fp32 logits as
# the trainer's hosted roles compute them. A recipe may redefine it, like rollout_server_command.
served_server_command() {
    local kind=$1 node=$2 j=$3 port=$4 module=sglang.launch_server
    local model=$TEACHER_MODEL server_gpus=$TEACHER_GPUS_PER_SERVER extra=("${TEACHER_SERVER_ARGS[@]}")
    if [[ $kind == ref ]]; then
        model=$REF_MODEL server_gpus=$REF_GPUS_PER_SERVER extra=("${REF_SERVER_ARGS[@]}")
    fi
    [[ $ROLLOUT_ENGINE == cpu ]] && module=megatron_gopd.cpu_server # the CPU stand-in (CI)
    CMD=("$SITE_PYTHON" -m "$module" --model-path "$model"
        --host 0.0.0.0 --port "$port" --nccl-port $((port + 1))
        --tp-size "$server_gpus" --base-gpu-id $((j * server_gpus))
        --enable-fp32-lm-head)
    if ((ROLLOUT_AUTH)); then
        # --api-key GOPD_TEACHER_API_KEY (GOPD_REF_API_KEY), from a file only this user can read
        CMD+=(--config "$(gopd_server_auth_file "$node" "$j")")
    fi
    CMD+=("${extra[@]}")
}

# The environment variable holding the API key of KIND's servers (rollout, teacher, ref).
gopd_key_var() {
    case $1 in
        teacher) echo GOPD_TEACHER_API_KEY ;;
        ref) echo GOPD_REF_API_KEY ;;
        *) echo GOPD_ROLLOUT_API_KEY ;;
    esac
}

# Writes the --config file of server J on node NODE with the job's key of KIND (default: the
# rollout servers'), not in a dry run.
gopd_write_server_auth() {
    ((ROLLOUT_AUTH)) && ((!DRY_RUN)) || return 0
    local file var
    var=$(gopd_key_var "${3:-rollout}")
    file=$(gopd_server_auth_file "$1" "$2")
    [[ -n ${!var:-} ]] || gopd_die "ROLLOUT_AUTH=1 but no $var" \
        "in the environment (the batch step makes one)"
    (
        umask 077
        printf 'api-key: "%s"\n' "${!var}" >"$file"
    )
    GOPD_AUTH_FILES+=("$file")
}

# The batch step's keys for this job's servers (unless the submitter exported them): one per kind
# (rollout, teacher, reference); the servers read theirs from their --config files, the trainer
# from its environment.
gopd_make_api_key() {
    ((ROLLOUT_AUTH)) || return 0
    local kind var
    for kind in rollout teacher ref; do
        case $kind in
            rollout) ((ROLLOUT_NODES + ROLLOUT_SERVERS_PER_NODE > 0)) || continue ;;
            teacher) ((TEACHER_NODES > 0)) || continue ;;
            ref) ((REF_NODES > 0)) || continue ;;
        esac
        var=$(gopd_key_var "$kind")
        if [[ -z ${!var:-} ]]; then
            printf -v "$var" '%s' "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
        fi
        export "${var?}"
    done
}

# Comment lines: how the trainer's weights reach server J on node NODE (the transport the
# trainer's --weight-sync resolves to, and which trainer ranks feed it).
gopd_print_weight_sync() {
    gopd_is_trainer || return 0
    local node=$1 j=$2 tp=$ROLLOUT_GPUS_PER_SERVER ws first t
    ws=$(gopd_weight_sync)
    case $ws in
        tensor)
            first=$((node * NPROC_PER_NODE + j * tp))
            for ((t = 0; t < tp; t++)); do
                printf '#   weights: tensor (CUDA IPC) to TP rank %d <- trainer rank %d, GPU %d of this node\n' \
                    "$t" $((first + t)) $((j * tp + t))
            done
            ;;
        distributed)
            first=$((1 + ((node - NODES) * ROLLOUT_SERVERS_PER_NODE + j) * tp))
            printf '#   weights: distributed (broadcast from trainer rank 0: NCCL, gloo on CPU), group ranks %d..%d\n' \
                "$first" $((first + tp - 1))
            ;;
        *) printf '#   weights: %s\n' "$ws" ;;
    esac
}

# torchrun on training node RANK, into the array CMD. Static rendezvous: node ranks follow the
# allocation order, so global rank r always lives on the same node (TP/PP groups are contiguous).
gopd_torchrun_command() {
    local rank=$1
    CMD=("$SITE_PYTHON" -m torch.distributed.run
        --nnodes="$NODES" --node-rank="$rank" --nproc-per-node="$NPROC_PER_NODE"
        --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"
        "${TORCHRUN_ARGS[@]}" "${ENTRY[@]}" "${ARGS[@]}")
    if ((${#GOPD_ROLLOUT_URLS[@]})); then
        CMD+=("$ROLLOUT_URLS_FLAG" "${GOPD_ROLLOUT_URLS[@]}")
    fi
    local IFS=,
    if ((${#GOPD_TEACHER_URLS[@]})); then
        CMD+=(--teacher-urls "${TEACHER_DOMAIN:+$TEACHER_DOMAIN=}${GOPD_TEACHER_URLS[*]}")
    fi
    if ((${#GOPD_REF_URLS[@]})); then
        CMD+=(--ref-urls "${REF_DOMAIN:+$REF_DOMAIN=}${GOPD_REF_URLS[*]}")
    fi
}

# srun for one step of ROLE (train | rollout), into the array CMD.
gopd_srun_command() {
    local role=$1 nodes relative
    if [[ $role == train ]]; then
        nodes=$NODES relative=0
    else
        nodes=$(gopd_server_step_nodes) relative=$NODES
    fi
    # the step name lets the batch step find it again (squeue --steps) to signal it
    CMD=(srun --job-name="gopd-$role" --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1
        --relative="$relative")
    # Without --cpus-per-task a step gets every CPU the job has on its nodes; a job that asked
    # for fewer keeps them (srun no longer reads SLURM_CPUS_PER_TASK itself since Slurm 22.05)
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then CMD+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
    if [[ -n $SITE_CONTAINER_IMAGE ]]; then
        local mounts=$GOPD_ROOT:$GOPD_ROOT,$LOG_ROOT:$LOG_ROOT
        [[ -n $SITE_CONTAINER_MOUNTS ]] && mounts+=",$SITE_CONTAINER_MOUNTS"
        CMD+=(--container-image="$SITE_CONTAINER_IMAGE" --container-mounts="$mounts"
            --container-workdir="${SLURM_SUBMIT_DIR:-$PWD}" "${SITE_CONTAINER_ARGS[@]}")
    fi
    # one node's task failing ends the step on every node: no rank waits forever in a
    # collective for a peer that is gone
    CMD+=("${SITE_SRUN_ARGS[@]}" --kill-on-bad-exit=1
        bash "$GOPD_ROOT/slurm/node.sh" "$role" "${GOPD_CLI[@]}")
}

# The sbatch command for this recipe and site, into the array CMD.
gopd_sbatch_command() {
    CMD=(sbatch --job-name="$JOB_NAME" --nodes=$((NODES + $(gopd_server_step_nodes))) --ntasks-per-node=1)
    if ((GPUS_PER_NODE > 0)); then
        case $SITE_GPU_REQUEST in
            gpus-per-node) CMD+=(--gpus-per-node="$GPUS_PER_NODE") ;;
            gres) CMD+=(--gres="gpu:$GPUS_PER_NODE") ;;
            none) ;;
        esac
    fi
    [[ -n $TIME_LIMIT ]] && CMD+=(--time="$TIME_LIMIT")
    [[ -n $SITE_PARTITION ]] && CMD+=(--partition="$SITE_PARTITION")
    [[ -n $SITE_ACCOUNT ]] && CMD+=(--account="$SITE_ACCOUNT")
    [[ -n $SITE_QOS ]] && CMD+=(--qos="$SITE_QOS")
    if ((REQUEUE)); then CMD+=(--requeue); else CMD+=(--no-requeue); fi
    # a requeued job appends to its logs instead of truncating the first attempt's;
    # USR1 to the batch shell before the time limit: time to checkpoint (and requeue)
    CMD+=(--open-mode=append --signal="B:USR1@$TIME_LIMIT_WARNING"
        --output="$LOG_ROOT/%x-%j.out" "${SITE_SBATCH_ARGS[@]}"
        "$GOPD_ROOT/slurm/gopd.sbatch" "${GOPD_CLI[@]}")
}

# ------------------------------------------------------------------------------ one node

# Runs (or, with DRY_RUN=1, prints) everything node INDEX does in ROLE. Returns the node's status.
gopd_node_main() {
    local role=$1 idx=$2 j port rc=0
    local host=${GOPD_HOSTS[idx]}
    GOPD_SERVER_PIDS=()
    GOPD_TRAIN_PID=""
    GOPD_AUTH_FILES=()
    gopd_node_setup
    if gopd_node_has_servers "$idx"; then
        for ((j = 0; j < ROLLOUT_SERVERS_PER_NODE; j++)); do
            port=$(gopd_server_port "$idx" "$j")
            rollout_server_command "$idx" "$j" "$port"
            gopd_write_server_auth "$idx" "$j"
            gopd_start_bg "$GOPD_LOG_DIR/node$idx-$host-server$j.log" "${CMD[@]}"
            GOPD_SERVER_PIDS+=("$GOPD_LAST_PID")
            ((DRY_RUN)) && gopd_print_weight_sync "$idx" "$j"
        done
    fi
    local kind mine=()
    kind=$(gopd_node_kind "$idx")
    if [[ $kind == teacher || $kind == ref ]]; then
        local per_node=$TEACHER_SERVERS_PER_NODE
        [[ $kind == ref ]] && per_node=$REF_SERVERS_PER_NODE
        for ((j = 0; j < per_node; j++)); do
            port=$(gopd_served_port "$kind" "$idx" "$j")
            served_server_command "$kind" "$idx" "$j" "$port"
            gopd_write_server_auth "$idx" "$j" "$kind"
            gopd_start_bg "$GOPD_LOG_DIR/node$idx-$host-$kind-server$j.log" "${CMD[@]}"
            GOPD_SERVER_PIDS+=("$GOPD_LAST_PID")
            mine+=("http://${GOPD_ADDRS[idx]}:$port")
        done
        ((DRY_RUN)) && printf '#   frozen %s: prefill scoring only, no weight sync\n' "$kind"
    fi
    if [[ $role == train ]]; then
        if ((${#GOPD_ROLLOUT_URLS[@]})); then
            gopd_wait_healthy "${GOPD_ROLLOUT_URLS[@]}" || return 1
        fi
        if ((${#GOPD_TEACHER_URLS[@]} + ${#GOPD_REF_URLS[@]})); then
            GOPD_WAIT_WHAT="teacher/reference" gopd_wait_healthy \
                "${GOPD_TEACHER_URLS[@]}" "${GOPD_REF_URLS[@]}" || return 1
        fi
        gopd_torchrun_command "$idx"
        gopd_start_bg "" "${CMD[@]}"
        GOPD_TRAIN_PID=$GOPD_LAST_PID
        ((DRY_RUN)) && return 0
        gopd_log "node $idx ($host): torchrun node rank $idx of $NODES started (pid $GOPD_TRAIN_PID)"
        gopd_wait_node
        rc=$GOPD_NODE_STATUS
        gopd_log "node $idx ($host): torchrun exited with status $rc"
    else
        if [[ $kind == rollout ]]; then
            for ((j = 0; j < ROLLOUT_SERVERS_PER_NODE; j++)); do
                mine+=("http://${GOPD_ADDRS[idx]}:$(gopd_server_port "$idx" "$j")")
            done
        fi
        GOPD_WAIT_WHAT=$kind gopd_wait_healthy "${mine[@]}" || return 1
        ((DRY_RUN)) && return 0
        gopd_log "node $idx ($host): ${#mine[@]} $kind server(s) up; serving until the job stops them"
        gopd_wait_node
        rc=$GOPD_NODE_STATUS
    fi
    return "$rc"
}

gopd_node_has_servers() {
    local idx=$1 n
    for n in $(gopd_server_nodes); do ((n == idx)) && return 0; done
    return 1
}

# Site modules and setup commands, then the environment (slurm/env.sh).
gopd_node_setup() {
    if ((${#SITE_MODULES[@]})); then
        if ((DRY_RUN)); then
            printf 'module load %s\n' "${SITE_MODULES[*]}"
        else
            if ! declare -F module >/dev/null && [[ -n ${MODULESHOME:-} ]]; then
                # shellcheck disable=SC1091
                source "$MODULESHOME/init/bash"
            fi
            module load "${SITE_MODULES[@]}"
        fi
    fi
    if [[ -n $SITE_SETUP ]]; then
        if ((DRY_RUN)); then printf '%s\n' "$SITE_SETUP"; else eval "$SITE_SETUP"; fi
    fi
    gopd_env_settings
    if ((!DRY_RUN)); then
        local kv
        for kv in "${GOPD_ENV[@]}"; do export "${kv?}"; done
    fi
}

# Start a command in the background (stdout+stderr to LOG, or to the node log when LOG is empty);
# its pid in GOPD_LAST_PID. Dry run: print it.
gopd_start_bg() {
    local log=$1
    shift
    if ((DRY_RUN)); then
        if [[ -n $log ]]; then
            gopd_print_cmd "$@" ">$(printf '%q' "$log")" "2>&1" "&"
        else
            gopd_print_cmd "$@"
        fi
        GOPD_LAST_PID=0
        return
    fi
    # USR1 is the launcher's own "checkpoint and stop" signal, sent to every process of a step:
    # children ignore it (an ignored signal stays ignored across exec) and node.sh passes the
    # trainer's STOP_SIGNAL to the training ranks only, so torchrun and the servers live on.
    if [[ -n $log ]]; then
        (
            trap '' USR1
            exec "$@"
        ) >"$log" 2>&1 &
    else
        (
            trap '' USR1
            exec "$@"
        ) &
    fi
    GOPD_LAST_PID=$!
    gopd_log "started pid $GOPD_LAST_PID: $*${log:+ (log: $log)}"
}

# GET URL/ROLLOUT_HEALTH_PATH until every URL answers 2xx. Fails on timeout, or as soon as a
# server of this node has exited (no point waiting for it), or when the node is being stopped.
gopd_wait_healthy() {
    if ((DRY_RUN)); then
        printf '# wait (at most %s s) until GET <url>%s answers for each of these %d %s server(s)\n' \
            "$ROLLOUT_HEALTH_TIMEOUT" "$ROLLOUT_HEALTH_PATH" "$#" "${GOPD_WAIT_WHAT:-rollout}"
        return 0
    fi
    local pending=("$@") still u pid deadline=$((SECONDS + ROLLOUT_HEALTH_TIMEOUT))
    gopd_log "waiting for $# ${GOPD_WAIT_WHAT:-rollout} server(s) to answer $ROLLOUT_HEALTH_PATH"
    while ((${#pending[@]})); do
        still=()
        for u in "${pending[@]}"; do gopd_http_ok "$u$ROLLOUT_HEALTH_PATH" || still+=("$u"); done
        pending=("${still[@]}")
        ((${#pending[@]})) || break
        for pid in "${GOPD_SERVER_PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null || {
                gopd_log "rollout server pid $pid exited before it was healthy (see its log)"
                return 1
            }
        done
        ((GOPD_STOPPING)) && return 1
        if ((SECONDS >= deadline)); then
            gopd_log "rollout servers not healthy after $ROLLOUT_HEALTH_TIMEOUT s: ${pending[*]}"
            return 1
        fi
        sleep 2
    done
    gopd_log "all $# rollout server(s) healthy"
}

gopd_http_ok() {
    if command -v curl >/dev/null; then
        curl -fsS -o /dev/null --max-time 10 "$1" 2>/dev/null
    else
        "$SITE_PYTHON" -c 'import sys, urllib.request as r; r.urlopen(sys.argv[1], timeout=10)' \
            "$1" 2>/dev/null
    fi
}

# Wait until the node's main process ends (torchrun; for a rollout node, any server) or a server
# dies under a running trainer. Sets GOPD_NODE_STATUS: torchrun's status, or for a rollout node
# 0 when the job stopped it and the server's status when one died.
gopd_wait_node() {
    local watched=("${GOPD_SERVER_PIDS[@]}") finished rc pid left
    GOPD_NODE_STATUS=0
    [[ -n $GOPD_TRAIN_PID ]] && watched+=("$GOPD_TRAIN_PID")
    while ((${#watched[@]})); do
        finished=""
        wait -n -p finished "${watched[@]}" && rc=0 || rc=$?
        if [[ -z ${finished:-} ]]; then
            continue # a trapped signal interrupted wait; its handler did what was needed
        fi
        # wait -n reaped it: never wait for it again
        left=()
        for pid in "${watched[@]}"; do [[ $pid == "$finished" ]] || left+=("$pid"); done
        watched=("${left[@]}")
        if [[ $finished == "$GOPD_TRAIN_PID" ]]; then
            GOPD_NODE_STATUS=$rc
            return
        fi
        if ((GOPD_STOPPING)); then
            GOPD_NODE_STATUS=0
            continue # a server stopping as asked; a trainer (if any) is still to be waited for
        fi
        gopd_log "rollout server pid $finished exited with status $rc; stopping this node"
        GOPD_NODE_STATUS=$((rc == 0 ? 1 : rc))
        GOPD_STOPPING=1
        gopd_stop_children TERM
        return
    done
}

# ------------------------------------------------------------------------------ stopping

GOPD_STOPPING=0

# Forward SIG to torchrun (it passes it on to its workers) and to the rollout servers.
gopd_stop_children() {
    local sig=$1 pid
    for pid in $GOPD_TRAIN_PID "${GOPD_SERVER_PIDS[@]}"; do
        kill -"$sig" "$pid" 2>/dev/null || true
    done
}

# The launcher's "checkpoint and stop" (USR1, see gopd_start_bg): STOP_SIGNAL to the training
# ranks (torchrun's children), which save and exit 0 (Megatron: --exit-signal-handler); torchrun
# then ends as it does after any run. A rollout node keeps serving until the job stops it.
gopd_checkpoint_and_stop() {
    [[ -n $GOPD_TRAIN_PID ]] || {
        gopd_log "USR1: no training on this node; rollout servers keep serving"
        return 0
    }
    local ranks=()
    mapfile -t ranks < <(gopd_children "$GOPD_TRAIN_PID")
    if ((${#ranks[@]} == 0)); then
        gopd_log "USR1: torchrun has no ranks yet; SIG$STOP_SIGNAL to torchrun"
        kill -s "$STOP_SIGNAL" "$GOPD_TRAIN_PID" 2>/dev/null || true
        return 0
    fi
    gopd_log "USR1: SIG$STOP_SIGNAL to the training ranks (pids ${ranks[*]}) to checkpoint and stop"
    kill -s "$STOP_SIGNAL" "${ranks[@]}" 2>/dev/null || true
}

# The pids whose parent is PID, from /proc (no ps in minimal containers). The command name in
# /proc/N/stat is in parentheses and may contain spaces: the fields after it start with the state,
# then the parent pid.
gopd_children() {
    local stat line rest
    for stat in /proc/[0-9]*/stat; do
        read -r line <"$stat" 2>/dev/null || continue
        rest=${line##*) }
        read -r _ rest _ <<<"$rest"
        [[ $rest == "$1" ]] && basename "$(dirname "$stat")"
    done
    return 0
}

# PID and all its descendants, parents first.
gopd_tree() {
    local child
    printf '%s\n' "$1"
    for child in $(gopd_children "$1"); do gopd_tree "$child"; done
}

# Wait for PID to end, at most GOPD_STOP_GRACE seconds, then SIGKILL it with all its descendants:
# killed alone, torchrun or an SGLang server would leave its workers to init, out of the reach of
# Slurm's process tracking where that follows parent pids (proctrack/linuxproc).
GOPD_STOP_GRACE=${GOPD_STOP_GRACE:-60}
gopd_reap() {
    local pid=$1 deadline=$((SECONDS + GOPD_STOP_GRACE)) tree
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            mapfile -t tree < <(gopd_tree "$pid")
            gopd_log "pid $pid still running $GOPD_STOP_GRACE s after SIGTERM: SIGKILL to ${tree[*]}"
            kill -KILL "${tree[@]}" 2>/dev/null || true
        fi
        sleep 0.5
    done
    wait "$pid" 2>/dev/null || true
}

# ------------------------------------------------------------------------------ printing

# A word quoted for the shell, left bare when it is plainly safe (readable paths, URLs, lists).
gopd_quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./:,=@%+-]+$ ]]; then
        printf '%s' "$1"
    else
        printf '%q' "$1"
    fi
}

# One command, quoted so it can be pasted, wrapped before each option and before a positional
# argument that follows a self-contained --flag=value. Trailing redirections and '&' (separate
# words starting with >, 2>, &) are printed verbatim.
gopd_print_cmd() {
    local out="" a prev="" i=0
    for a in "$@"; do
        if ((i == 0)); then
            out=$(gopd_quote "$a")
        elif [[ $a == \>* || $a == 2\>* || $a == \& ]]; then
            out+=" $a"
        elif [[ $a == -* && ! ($i == 1 && $a == -m) ]] || [[ $a != -* && $prev == --*=* ]]; then
            out+=$' \\\n    '"$(gopd_quote "$a")"
        else
            out+=" $(gopd_quote "$a")"
        fi
        prev=$a
        i=$((i + 1))
    done
    printf '%s\n' "$out"
}

# The whole plan: environment, batch-step commands, and each node's commands.
gopd_print_plan() {
    local i role
    printf '# recipe %s (site %s)\n' "$GOPD_RECIPE" "$GOPD_SITE_FILE"
    printf '# %d training node(s) x %d rank(s), rollout mode %s' "$NODES" "$NPROC_PER_NODE" "$ROLLOUT_MODE"
    case $ROLLOUT_MODE in
        colocated) printf ', %d server(s) on each training node' "$ROLLOUT_SERVERS_PER_NODE" ;;
        disaggregated) printf ', %d rollout node(s) x %d server(s)' "$ROLLOUT_NODES" "$ROLLOUT_SERVERS_PER_NODE" ;;
    esac
    ((TEACHER_NODES)) && printf '; served teacher: %d node(s) x %d server(s) of %d GPU(s)' \
        "$TEACHER_NODES" "$TEACHER_SERVERS_PER_NODE" "$TEACHER_GPUS_PER_SERVER"
    ((REF_NODES)) && printf '; served reference: %d node(s) x %d server(s) of %d GPU(s)' \
        "$REF_NODES" "$REF_SERVERS_PER_NODE" "$REF_GPUS_PER_SERVER"
    printf '\n'
    if ((GOPD_SIMULATED)); then
        printf '# (not in an allocation: hosts %s..%s and job id 0 stand in for it)\n' \
            "${GOPD_HOSTS[0]}" "${GOPD_HOSTS[${#GOPD_HOSTS[@]} - 1]}"
    fi
    printf '\n## environment on every node (slurm/env.sh)\n'
    gopd_env_settings
    local kv
    for kv in "${GOPD_ENV[@]}"; do printf 'export %s=%s\n' "${kv%%=*}" "$(gopd_quote "${kv#*=}")"; done
    printf '\n## batch step (on %s); logs in %s\n' "${GOPD_HOSTS[0]}" "$GOPD_LOG_DIR"
    if ((ROLLOUT_AUTH && ROLLOUT_NODES + ROLLOUT_SERVERS_PER_NODE > 0)); then
        printf '# GOPD_ROLLOUT_API_KEY: a random key for this job, made here; the servers read it from\n'
        printf '# mode-600 --config files on their nodes, the trainer from its environment\n'
    fi
    if ((ROLLOUT_AUTH && TEACHER_NODES + REF_NODES > 0)); then
        printf '# GOPD_TEACHER_API_KEY / GOPD_REF_API_KEY: the same, for the served teacher / reference\n'
    fi
    if (($(gopd_server_step_nodes))); then
        gopd_srun_command rollout
        gopd_print_cmd "${CMD[@]}" "&"
    fi
    gopd_srun_command train
    gopd_print_cmd "${CMD[@]}"
    for ((i = 0; i < NODES + $(gopd_server_step_nodes); i++)); do
        role=train
        ((i >= NODES)) && role=rollout
        printf '\n## node %d (%s): %s; log %s\n' "$i" "${GOPD_HOSTS[i]}" "$(gopd_node_kind "$i")" \
            "$GOPD_LOG_DIR/node$i-${GOPD_HOSTS[i]}.log"
        (gopd_node_main "$role" "$i")
    done
}
