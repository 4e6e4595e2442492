#!/usr/bin/env bash
# A real, throw-away SLURM cluster on this machine, for the end-to-end tests of the launchers (and
# for users who want to try them without a cluster).
#
#   launch/local-cluster.sh up [--nodes N]   # N = 1 (default) or 2; idempotent
#   launch/local-cluster.sh down             # stops only what `up` started; safe to run twice
#   launch/local-cluster.sh status
#
# Then:  . /tmp/megatron-lite-cluster/env.sh   (or export SLURM_CONF=... as `up` prints)
#        sbatch --ntasks=2 --wrap 'srun hostname'; scontrol show job -o <id>
#
# Needs root (daemons, network namespaces). Installs slurm-wlm and munge with apt when missing.
# Everything lives in one state directory, $LOCAL_CLUSTER_DIR (default /tmp/megatron-lite-cluster):
# slurm.conf (+ cgroup.conf), env.sh, pids/, log/, spool/, munge/. /etc/slurm and the system munge
# are left alone: munged runs with a private key and socket (slurm.conf: AuthInfo=socket=...).
#
# One node: slurmctld + `slurmd -N $(hostname -s)` on 127.0.0.1.
# Two nodes: network namespaces mlite-n1/mlite-n2 (eth0 = 10.213.77.11/.12) on bridge mlbr0 (host
# 10.213.77.1, where slurmctld is reached); each slurmd runs in its namespace via
# `nsenter --net=/run/netns/<node>` (NOT `ip netns exec`: that remounts /sys and hides
# /sys/fs/cgroup). Only the network is separate: both "nodes" share the host's hostname, /proc,
# filesystem and CPUs. The node names resolve through marked lines in /etc/hosts (removed by
# `down`), so the usual `MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)`
# works; without /etc/hosts, the address is in
#   scontrol show node <name> | grep -o 'NodeAddr=[^ ]*'
# and in env.sh (MLITE_NODES, MLITE_NODE_ADDRS, MLITE_IFNAME). In a namespace, distributed code must
# use interface eth0 (GLOO_SOCKET_IFNAME=eth0): `hostname` is still the host's, which resolves to
# 127.0.0.1. Plain torchrun across the namespaces: nsenter --net=/run/netns/mlite-n1 torchrun ...
#
# Facts measured on this cluster (Slurm 22.05.8, Debian bookworm; tests/e2e/test_local_cluster.py
# re-checks them; details in tests/e2e/cluster.py):
# (a) A batch script may requeue itself with `scontrol requeue $SLURM_JOB_ID` (returns 0), but the
#     SIGTERM to the whole job follows within milliseconds: a next `scontrol update
#     JobId=$SLURM_JOB_ID StartTime=now` normally never runs, and under a TERM trap it runs (rc 0)
#     to no effect - the job is COMPLETING until the script is gone, and only then turns PENDING,
#     Reason=BeginTime, EligibleTime = requeue + 121 s. From outside (root), `scontrol update
#     JobId=N StartTime=now` on the PENDING job starts it again within ~1 s here.
# (b) `scancel --signal=USR1 JOBID` (no -b/-f) signals the tasks srun started, in every step, not
#     the batch shell (nor srun). -b: only the batch shell. -f/--full: the batch shell and the
#     tasks. The tasks' children: not with proctrack/cgroup (one node here, and most clusters),
#     yes with proctrack/linuxproc (two nodes here).
# (c) `--signal=USR1@T`: sent to the tasks like (b) (`B:USR1@T`: the batch shell only) at the first
#     of slurmctld's time-limit checks (every 30 s) that finds <= T+30 s left: normally 0-30 s
#     before the requested time. With --time=1 and @30 (or @50) it arrives at the first check
#     after the start (measured 29.6 s and 7 s); the TIMEOUT kill at the first check >= 60 s.
set -euo pipefail

DIR="${LOCAL_CLUSTER_DIR:-/tmp/megatron-lite-cluster}"
CONF="$DIR/slurm.conf"
# Not the default 6817/6818, so a real slurm on this machine is never disturbed.
CTLD_PORT=16817
SLURMD_PORT=16818
BRIDGE=mlbr0
NET=10.213.77
HOSTS_MARK="# megatron-lite local-cluster"

log() { echo "local-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

# ---------------------------------------------------------------------------------------------------
# installation

ensure_installed() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && command -v nsenter >/dev/null && command -v ip >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm/munge missing and no apt-get to install them"
    log "installing slurm-wlm and munge (apt)"
    # DPkg::Lock::Timeout: another install (e.g. a parallel CI step) may hold the dpkg lock.
    DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 install \
        slurm-wlm munge iproute2 util-linux >/dev/null
}

# ---------------------------------------------------------------------------------------------------
# pids: every daemon writes its own pid file; we only ever signal those pids, and only when the
# process is still the program we started (pids get reused).

pid_alive() {  # pid_alive PIDFILE PROGRAM
    local pid
    # cat, not $(<...): a daemon removes its own pid file as it exits, and under set -e a failed
    # $(<file) ends the whole script even inside `||` (CI: `down` died stopping munged).
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2"* ]] || return 1
    # A zombie (exited, not yet reaped by init) is not running.
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]
}

stop_pidfile() {  # stop_pidfile PIDFILE PROGRAM
    local pid i
    pid_alive "$1" "$2" || { rm -f "$1"; return 0; }
    pid=$(cat "$1" 2>/dev/null) || { rm -f "$1"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        pid_alive "$1" "$2" || break
        sleep 0.1
    done
    if pid_alive "$1" "$2"; then
        log "$2 ($pid) ignored SIGTERM; killing"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$1"
}

node_names() {  # the node names of the cluster described by $DIR/nodes
    local n
    n=$(cat "$DIR/nodes" 2>/dev/null || echo 0)
    if [[ $n == 1 ]]; then cat "$DIR/nodename"; elif [[ $n == 2 ]]; then echo mlite-n1 mlite-n2; fi
}

# slurmstepd processes are started by slurmd, not by us, but they belong to this cluster: they
# inherit slurmd's environment, which holds SLURM_CONF=$CONF. Tasks die with their stepd.
our_stepds() {
    local p
    for p in /proc/[0-9]*; do
        [[ "$(cat "$p/comm" 2>/dev/null)" == slurmstepd ]] || continue
        # (a zombie has no environ: it is gone already)
        { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$CONF" && echo "${p#/proc/}"
    done
    return 0
}

# ---------------------------------------------------------------------------------------------------
# configuration

# Node topology for slurm.conf: the real one from `slurmd -C`, but with at least 4 CPUs (more cores
# per socket), so the tests can run 4 ranks on a 2-core machine (SlurmdParameters=config_overrides
# makes slurmd accept the declared, larger node).
node_topology() {
    local c sockets boards cores threads mem cpus
    c=$(slurmd -C | head -n1)
    get() { grep -o "$1=[0-9]*" <<<"$c" | cut -d= -f2; }
    boards=$(get Boards); sockets=$(get SocketsPerBoard); cores=$(get CoresPerSocket)
    threads=$(get ThreadsPerCore); mem=$(get RealMemory)
    sockets=$(( ${boards:-1} * ${sockets:-1} ))
    cpus=$(( sockets * cores * threads ))
    while (( cpus < 4 )); do
        cores=$(( cores + 1 )); cpus=$(( sockets * cores * threads ))
    done
    echo "CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem"
}

write_config() {  # write_config NODES
    local nodes=$1 host topo proctrack
    host=$(hostname -s)
    topo=$(node_topology)
    # proctrack/cgroup needs the cgroup v1 freezer. With two slurmds on one machine it is not
    # usable: both would track job N's steps in the same /sys/fs/cgroup/freezer/slurm/uid_0/job_N
    # (Debian's slurm is built without --enable-multiple-slurmd, which would add the node name),
    # so one node's cleanup could kill the other's tasks. linuxproc follows the process tree.
    proctrack=proctrack/linuxproc
    if [[ $nodes == 1 && -d /sys/fs/cgroup/freezer ]] && grep -q ' /sys/fs/cgroup/freezer cgroup ' /proc/mounts; then
        proctrack=proctrack/cgroup
    fi
    {
        cat <<EOF
# Generated by launch/local-cluster.sh ($nodes node(s)); rewritten by every \`up\`.
ClusterName=mlite
SlurmctldHost=$host($( [[ $nodes == 1 ]] && echo 127.0.0.1 || echo "$NET.1" ))
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/pids/slurmctld.pid
SlurmdPidFile=$DIR/pids/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
MpiDefault=none
SwitchType=switch/none
ProctrackType=$proctrack
# task/affinity would bind to the extra, declared-only CPUs; nothing here needs binding.
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
# No accounting: use \`scontrol show job\` (sacct does not work); MinJobAge keeps finished jobs
# readable there for 2 minutes.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=120
JobRequeue=1
ReturnToService=2
# Short timeouts: tests must not wait minutes for a dead node or an unkillable step.
KillWait=10
MessageTimeout=10
SlurmdTimeout=30
SlurmctldTimeout=30
InactiveLimit=0
Waittime=0
UnkillableStepTimeout=60
EOF
        if [[ $nodes == 1 ]]; then
            echo "NodeName=$host NodeAddr=127.0.0.1 $topo State=UNKNOWN"
        else
            echo "NodeName=mlite-n1 NodeAddr=$NET.11 $topo State=UNKNOWN"
            echo "NodeName=mlite-n2 NodeAddr=$NET.12 $topo State=UNKNOWN"
        fi
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF"
    # The system's /etc/slurm/plugstack.conf (and its include dir) is not ours to depend on.
    : >"$DIR/plugstack.conf"
    if [[ $proctrack == proctrack/cgroup ]]; then
        cat >"$DIR/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
    else
        rm -f "$DIR/cgroup.conf"
    fi
}

write_env() {  # write_env NODES
    {
        echo "# Source me: the local SLURM cluster started by launch/local-cluster.sh"
        echo "export SLURM_CONF=$CONF"
        if [[ $1 == 2 ]]; then
            echo "export MLITE_NODES=\"mlite-n1 mlite-n2\""
            echo "export MLITE_NODE_ADDRS=\"$NET.11 $NET.12\""
            echo "export MLITE_IFNAME=eth0"
            echo "export MLITE_NETNS_DIR=/run/netns"
        else
            echo "export MLITE_NODES=\"$(cat "$DIR/nodename")\""
            echo "export MLITE_NODE_ADDRS=127.0.0.1"
            echo "export MLITE_IFNAME=lo"
        fi
    } >"$DIR/env.sh"
}

# ---------------------------------------------------------------------------------------------------
# network (two nodes)

net_up() {
    local i ns
    # Everything we create is listed in $DIR/created, so `down` removes exactly that.
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        echo "bridge $BRIDGE" >>"$DIR/created"
    fi
    ip addr replace "$NET.1/24" dev "$BRIDGE"
    # If br_netfilter is loaded, bridged ns<->ns packets would go through iptables' FORWARD chain
    # (a DROP policy, e.g. docker's, would cut the nodes apart): opt this bridge out. Best effort.
    ip link set "$BRIDGE" type bridge nf_call_iptables 0 2>/dev/null || true
    ip link set "$BRIDGE" up
    for i in 1 2; do
        ns=mlite-n$i
        if ! ip netns list | grep -qw "$ns"; then
            ip netns add "$ns"
            echo "netns $ns" >>"$DIR/created"
        fi
        if ! ip link show "mlite-v$i" >/dev/null 2>&1; then
            ip link add "mlite-v$i" type veth peer name eth0 netns "$ns"
            echo "link mlite-v$i" >>"$DIR/created"
        fi
        ip link set "mlite-v$i" master "$BRIDGE" up
        ip -n "$ns" addr replace "$NET.1$i/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        # Host-side traffic (slurmctld, munge is a unix socket) goes via the bridge address.
        ip -n "$ns" route replace default via "$NET.1" dev eth0
    done
    hosts_add
}

net_down() {
    local kind name
    hosts_remove
    [[ -f $DIR/created ]] || return 0
    # Reverse order: veths before namespaces before the bridge.
    tac "$DIR/created" | while read -r kind name; do
        case $kind in
            link) ip link del "$name" 2>/dev/null || true ;;
            netns) ip netns del "$name" 2>/dev/null || true ;;
            bridge) ip link del "$name" 2>/dev/null || true ;;
        esac
    done
    rm -f "$DIR/created"
}

# /etc/hosts may be a bind mount (containers): rewrite it in place, never replace the file.
hosts_add() {
    hosts_remove
    printf '%s.11 mlite-n1 %s\n%s.12 mlite-n2 %s\n' "$NET" "$HOSTS_MARK" "$NET" "$HOSTS_MARK" >>/etc/hosts
}

hosts_remove() {
    local kept
    grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null || return 0
    kept=$(grep -vF "$HOSTS_MARK" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
}

# ---------------------------------------------------------------------------------------------------
# daemons

start_munge() {
    local m=$DIR/munge
    mkdir -p "$m"
    # A private key: independent of (and not touching) /etc/munge and any system munged.
    [[ -s $m/munge.key ]] || dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$m"
    # munged insists that everyone may traverse the socket's directory (job users must reach it).
    chmod 0755 "$m"
    chmod 0400 "$m/munge.key"
    # munged refuses to run as root; it daemonizes and writes its pid file itself.
    runuser -u munge -- munged --socket="$m/munge.socket.2" --key-file="$m/munge.key" \
        --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
        </dev/null >>"$DIR/log/daemons.out" 2>&1 9>&-
    ln -sf "$m/munged.pid" "$DIR/pids/munged.pid"
    ln -sf "$m/munged.log" "$DIR/log/munged.log"
    wait_for "munged" 50 test -S "$m/munge.socket.2"
}

wait_for() {  # wait_for WHAT TENTHS_OF_SECONDS COMMAND...
    local what=$1 n=$2 i
    shift 2
    for ((i = 0; i < n; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what did not come up; see $DIR/log/"
}

nodes_idle() {  # all nodes idle (or mixed/allocated: in use by a job is fine too)
    local states
    states=$(SLURM_CONF=$CONF sinfo -h -N -o '%T' 2>/dev/null) || return 1
    [[ -n $states ]] || return 1
    ! grep -qvE '^(idle|mixed|allocated)$' <<<"$states"
}

cluster_healthy() {  # cluster_healthy NODES
    local node
    [[ "$(cat "$DIR/nodes" 2>/dev/null)" == "$1" ]] || return 1
    pid_alive "$DIR/pids/munged.pid" munged || return 1
    pid_alive "$DIR/pids/slurmctld.pid" slurmctld || return 1
    for node in $(node_names); do
        pid_alive "$DIR/pids/slurmd-$node.pid" slurmd || return 1
    done
    SLURM_CONF=$CONF scontrol ping >/dev/null 2>&1
}

cmd_up() {
    local nodes=1 node
    while (($#)); do
        case $1 in
            --nodes) nodes=${2:-}; shift 2 ;;
            --nodes=*) nodes=${1#*=}; shift ;;
            *) usage ;;
        esac
    done
    [[ $nodes == 1 || $nodes == 2 ]] || die "--nodes must be 1 or 2"
    if cluster_healthy "$nodes"; then
        log "already up ($nodes node(s))"
        print_env
        return 0
    fi
    # Another node count, or a half-dead cluster: start from scratch.
    [[ -f $DIR/nodes ]] && cmd_down
    ensure_installed
    mkdir -p "$DIR/pids" "$DIR/log" "$DIR/spool"
    # A fresh controller every time (job ids restart at 1, no stale node state).
    rm -rf "$DIR/spool/ctld" "$DIR"/spool/slurmd-*
    mkdir -p "$DIR/spool/ctld"
    echo "$nodes" >"$DIR/nodes"
    hostname -s >"$DIR/nodename"
    write_config "$nodes"
    write_env "$nodes"
    export SLURM_CONF=$CONF
    start_munge
    [[ $nodes == 2 ]] && net_up
    # Daemons must not keep our stdout/stderr open: a caller reading them (subprocess.run with
    # capture_output, $(...)) would otherwise wait forever for EOF. Nor fd 9: it holds our lock.
    slurmctld -f "$CONF" </dev/null >>"$DIR/log/daemons.out" 2>&1 9>&-
    wait_for slurmctld 100 scontrol ping
    for node in $(node_names); do
        mkdir -p "$DIR/spool/slurmd-$node"
        if [[ $nodes == 1 ]]; then
            slurmd -f "$CONF" -N "$node" </dev/null >>"$DIR/log/daemons.out" 2>&1 9>&-
        else
            nsenter --net="/run/netns/$node" slurmd -f "$CONF" -N "$node" \
                </dev/null >>"$DIR/log/daemons.out" 2>&1 9>&-
        fi
    done
    wait_for "the slurmd node(s)" 300 nodes_idle
    log "up: $nodes node(s): $(node_names)"
    print_env
}

print_env() {
    echo "export SLURM_CONF=$CONF"
    echo "# or: . $DIR/env.sh" >&2
}

cmd_down() {
    local node
    if [[ -f $CONF ]] && pid_alive "$DIR/pids/slurmctld.pid" slurmctld; then
        # Cancel jobs first so their slurmstepds (and tasks) end cleanly.
        local jobs
        jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            for _ in $(seq 50); do
                [[ -z "$(our_stepds)" ]] && break
                sleep 0.2
            done
        fi
    fi
    for node in mlite-n1 mlite-n2 $(cat "$DIR/nodename" 2>/dev/null); do
        stop_pidfile "$DIR/pids/slurmd-$node.pid" slurmd
    done
    stop_pidfile "$DIR/pids/slurmctld.pid" slurmctld
    # Any slurmstepd left (e.g. a step that ignored its cancel) belongs to this cluster too.
    local pid
    for pid in $(our_stepds); do kill -KILL "$pid" 2>/dev/null || true; done
    stop_pidfile "$DIR/pids/munged.pid" munged
    rm -f "$DIR/pids/munged.pid" "$DIR/munge/munged.pid"
    net_down
    rm -f "$DIR/nodes" "$DIR/env.sh"
    log "down"
}

cmd_status() {
    local n node
    n=$(cat "$DIR/nodes" 2>/dev/null || true)
    if [[ -z $n ]]; then
        echo "down"
        return 3
    fi
    echo "nodes: $n ($(node_names))   state dir: $DIR"
    for p in munged slurmctld $(for node in $(node_names); do echo "slurmd-$node"; done); do
        if pid_alive "$DIR/pids/$p.pid" "${p%%-*}"; then
            echo "  $p: running (pid $(cat "$DIR/pids/$p.pid" 2>/dev/null))"
        else
            echo "  $p: NOT running"
        fi
    done
    SLURM_CONF=$CONF sinfo -N -l 2>/dev/null || true
    if ! cluster_healthy "$n"; then
        echo "unhealthy"
        return 1
    fi
    echo "healthy"
}

main() {
    [[ $# -ge 1 ]] || usage
    local cmd=$1
    shift
    case $cmd in
        up | down | status) ;;
        *) usage ;;
    esac
    [[ $(id -u) == 0 ]] || die "must run as root (daemons, network namespaces)"
    mkdir -p "$DIR"
    # One `up`/`down` at a time (tests in parallel, a CI trap racing a fixture).
    exec 9>"$DIR.lock"
    flock 9
    "cmd_$cmd" "$@"
}

main "$@"
