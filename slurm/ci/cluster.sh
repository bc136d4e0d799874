#!/usr/bin/env bash
# A real Slurm cluster on one host, for CI and local tests: munged + slurmctld + two slurmd that
# emulate the nodes n1 and n2 (Debian's slurm-wlm is built with multiple-slurmd support).
#
#   slurm/ci/cluster.sh start    # idempotent: reuses a healthy cluster, (re)starts anything missing
#   slurm/ci/cluster.sh env      # prints `export SLURM_CONF=...` for the shell that submits jobs
#   slurm/ci/cluster.sh status
#   slurm/ci/cluster.sh stop     # stops only the daemons this script started (by their pid files)
#
# Every emulated node is a network namespace of its own (gopd-PORT-n1, ...), with one interface
# (gopd0) and a private address (10.87.X.1, .2, ...) on a bridge in the host's namespace, where
# slurmctld listens (10.87.X.254). A node's 127.0.0.1 is its own: a job step, a server and a
# trainer on n1 reach n2 only at n2's address, as on real nodes, so no multi-node test can pass by
# sharing a loopback. Needs root (ip netns); the addresses exist only inside this cluster.
#
# Everything else lives in one state directory (config, keys, sockets, pid files, logs, spool), so
# the cluster never touches /etc/slurm, /etc/munge or a munged/slurmd someone else runs on the host.
# Settings that make it work without systemd or cgroups (see ../../shared/DESIGN.md, section 4):
# proctrack/linuxproc (tracks a job's processes by parent pid), task/none, SlurmUser=root.
#
# Environment: GOPD_SLURM_CI_DIR (state directory, default ${TMPDIR:-/tmp}/gopd-slurm-ci-$UID),
# GOPD_SLURM_CI_PORT (first of the three ports it uses, default 16817; it also names the
# namespaces and picks the subnet), GOPD_SLURM_CI_NODES (number of emulated nodes, default 2),
# GOPD_SLURM_CI_CPUS (CPUs each node claims, default: nproc), GOPD_SLURM_CI_SUBNET (the nodes'
# /24 as A.B.C, default 10.87.$((PORT % 250))).
set -euo pipefail

STATE_DIR=${GOPD_SLURM_CI_DIR:-${TMPDIR:-/tmp}/gopd-slurm-ci-$(id -u)}
PORT=${GOPD_SLURM_CI_PORT:-16817}
NUM_NODES=${GOPD_SLURM_CI_NODES:-2}
CPUS=${GOPD_SLURM_CI_CPUS:-$(nproc)}
CONF="$STATE_DIR/slurm.conf"
MUNGE_SOCKET="$STATE_DIR/munge/munge.socket"
SUBNET=${GOPD_SLURM_CI_SUBNET:-10.87.$((PORT % 250))}
CTLD_ADDR=$SUBNET.254
BRIDGE=gopdbr$PORT
NODE_IF=gopd0 # the interface of every node, inside its namespace (slurm/ci/site.sh names it)

log() { printf '[slurm-ci] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

node_names() {
    local i
    for ((i = 1; i <= NUM_NODES; i++)); do printf 'n%d\n' "$i"; done
}

node_ns() { printf 'gopd-%s-%s\n' "$PORT" "$1"; }  # the namespace of node NAME
node_addr() { printf '%s.%s\n' "$SUBNET" "${1#n}"; }  # the address of node NAME

# The bridge with slurmctld's address, and a namespace per node wired to it by a veth pair.
# Idempotent: what exists is kept.
start_network() {
    local name ns host_end i=0
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    for name in $(node_names); do
        i=$((i + 1))
        ns=$(node_ns "$name")
        host_end=gopd${PORT}n$i
        ip netns list | grep -qx "$ns\( .*\)\?" || ip netns add "$ns"
        if ! ip link show "$host_end" >/dev/null 2>&1; then
            ip link add "$host_end" type veth peer name "$NODE_IF" netns "$ns"
            ip link set "$host_end" master "$BRIDGE"
            ip -n "$ns" addr add "$(node_addr "$name")/24" dev "$NODE_IF"
        fi
        ip link set "$host_end" up
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "$NODE_IF" up
    done
}

stop_network() {
    local name i=0
    for name in $(node_names); do
        i=$((i + 1))
        ip netns del "$(node_ns "$name")" 2>/dev/null || true
        ip link del "gopd${PORT}n$i" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
}

# A pid file whose process is alive (and is the daemon named, not a recycled pid). A daemon
# removes its pid file as it exits, so the file may vanish between any test and the read.
pid_alive() {
    local pidfile=$1 name=$2 pid comm
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name"* ]]
}

require_tools() {
    local t missing=()
    for t in munged slurmctld slurmd sbatch scontrol ip nsenter; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    ((${#missing[@]} == 0)) ||
        die "missing ${missing[*]}: apt-get install slurmctld slurmd slurm-client munge iproute2"
    ((EUID == 0)) || die "the emulated nodes are network namespaces: run as root (or with sudo)"
}

write_config() {
    mkdir -p "$STATE_DIR"/{munge,state,spool,log}
    chmod 700 "$STATE_DIR" "$STATE_DIR/munge"
    if [[ ! -s $STATE_DIR/munge/munge.key ]]; then
        # a private key: jobs of this cluster only, never /etc/munge/munge.key
        dd if=/dev/urandom of="$STATE_DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$STATE_DIR/munge/munge.key"
    fi
    local nodes tmp name i=0
    nodes=$(node_names | paste -sd, -)
    tmp=$(mktemp "$STATE_DIR/slurm.conf.XXXXXX")
    {
        cat <<CONF
# Written by slurm/ci/cluster.sh: a one-host test cluster, one network namespace per node.
ClusterName=gopdci
SlurmctldHost=localhost($CTLD_ADDR)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
# no systemd, no cgroup v1/v2 delegation here: track job processes through their parent pids
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# look at pending jobs every 2 s (default 60): a requeued job starts as soon as it may
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# short timers: a test cluster should kill, requeue and report jobs quickly. sbatch --wait
# polls every 2 s only while 2 >= MinJobAge/2 (integer division; else every 8 s, then 32 s), and
# a finished job stays visible for MinJobAge seconds: 5 lets a 2 s poll see it with 3 s to spare.
KillWait=5
MinJobAge=5
SlurmdTimeout=60
InactiveLimit=0
CONF
        for name in $(node_names); do
            i=$((i + 1))
            printf 'NodeName=%s NodeAddr=%s Port=%d CPUs=%d State=UNKNOWN\n' \
                "$name" "$(node_addr "$name")" $((PORT + i)) "$CPUS"
        done
        printf 'PartitionName=debug Nodes=%s Default=YES MaxTime=INFINITE State=UP\n' "$nodes"
    } >"$tmp"
    if [[ -f $CONF ]] && ! cmp -s "$tmp" "$CONF" && daemons_alive; then
        log "configuration changed: restarting the daemons"
        cmd_stop
    fi
    mv "$tmp" "$CONF"
}

daemons_alive() {
    local name
    pid_alive "$STATE_DIR/slurmctld.pid" slurmctld && return 0
    for name in $(node_names); do pid_alive "$STATE_DIR/slurmd-$name.pid" slurmd && return 0; done
    return 1
}

start_munged() {
    pid_alive "$STATE_DIR/munge/munged.pid" munged && return 0
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # --force: munged refuses to start as root or with a socket outside /run/munge otherwise
    munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE_DIR/munge/munge.key" \
        --pid-file="$STATE_DIR/munge/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
        --seed-file="$STATE_DIR/munge/munged.seed"
}

start_slurmctld() {
    pid_alive "$STATE_DIR/slurmctld.pid" slurmctld && return 0
    # -c: a cold start, forgetting jobs from an earlier run of this test cluster
    slurmctld -c -f "$CONF"
}

start_slurmd() {
    local name
    for name in $(node_names); do
        pid_alive "$STATE_DIR/slurmd-$name.pid" slurmd && continue
        mkdir -p "$STATE_DIR/spool/$name"
        # the node's processes (its job steps) live in its namespace
        # (nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup fs slurmd reads)
        nsenter --net="/run/netns/$(node_ns "$name")" slurmd -f "$CONF" -N "$name"
    done
}

wait_ready() {
    local deadline=$((SECONDS + 60)) idle
    while ((SECONDS < deadline)); do
        idle=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | wc -l)
        if ((idle == NUM_NODES)); then
            log "ready: $NUM_NODES idle nodes (SLURM_CONF=$CONF)"
            return 0
        fi
        sleep 1
    done
    SLURM_CONF=$CONF sinfo -N -l >&2 || true
    die "nodes not idle after 60 s; logs in $STATE_DIR/log"
}

cmd_start() {
    require_tools
    write_config
    start_network
    start_munged
    start_slurmctld
    start_slurmd
    wait_ready
}

stop_pidfile() {
    local pidfile=$1 name=$2 pid i
    pid_alive "$pidfile" "$name" || return 0
    pid=$(cat "$pidfile" 2>/dev/null) || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        pid_alive "$pidfile" "$name" || return 0
        sleep 0.2
    done
    log "$name ($pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
    [[ -d $STATE_DIR ]] || return 0
    local name
    # cancel what is still queued so no slurmstepd outlives its slurmd
    if pid_alive "$STATE_DIR/slurmctld.pid" slurmctld; then
        SLURM_CONF=$CONF scancel --full --quiet --partition=debug 2>/dev/null || true
    fi
    for name in $(node_names); do
        stop_pidfile "$STATE_DIR/slurmd-$name.pid" slurmd
    done
    stop_pidfile "$STATE_DIR/slurmctld.pid" slurmctld
    stop_pidfile "$STATE_DIR/munge/munged.pid" munged
    stop_network
    log "stopped (state kept in $STATE_DIR)"
}

cmd_status() {
    local name rc=0
    pid_alive "$STATE_DIR/munge/munged.pid" munged || { log "munged: down"; rc=1; }
    pid_alive "$STATE_DIR/slurmctld.pid" slurmctld || { log "slurmctld: down"; rc=1; }
    for name in $(node_names); do
        pid_alive "$STATE_DIR/slurmd-$name.pid" slurmd || { log "slurmd $name: down"; rc=1; }
    done
    ((rc == 0)) && SLURM_CONF=$CONF sinfo -N
    return "$rc"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) printf 'export SLURM_CONF=%q\n' "$CONF" ;;
    *)
        printf 'usage: %s start|stop|status|env\n' "$0" >&2
        exit 2
        ;;
esac
