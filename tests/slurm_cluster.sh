#!/usr/bin/env bash
# A real single-host SLURM cluster for the tests: munge, slurmctld and slurmd of Debian's
# slurm-wlm (22.05), all state, logs and sockets in one folder, addressed over loopback.
#
#   tests/slurm_cluster.sh install     install slurm-wlm and munge with apt-get when missing
#   tests/slurm_cluster.sh start DIR   write DIR/slurm.conf, start the daemons, wait for an idle node
#   tests/slurm_cluster.sh stop DIR    cancel DIR's jobs, stop the daemons this script started there
#
# After start, SLURM_CONF=DIR/slurm.conf points sbatch/squeue/scancel at this cluster (the
# daemons' pids are in DIR/*.pid). No systemd and no cgroups: the daemons are started by hand,
# processes are tracked through /proc (proctrack/linuxproc), tasks are not confined
# (task/none). There is no slurmdbd, so sacct has nothing to read: finished jobs are recorded
# by jobcomp/filetxt in DIR/jobcomp.txt (one line per job with its JobState).
# Any failure exits non-zero with one line on stderr saying why (the tests skip with it).
set -euo pipefail

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and this is not root (apt-get needs root)"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 \
        || die "apt-get install slurm-wlm munge failed"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "$what within ${seconds} s"
}

start() {
    local dir=$1
    command -v slurmctld >/dev/null || die "slurmctld is not installed (run: $0 install)"
    mkdir -p "$dir"/{state,spool,log,munge}
    dir=$(cd "$dir" && pwd)
    chmod 700 "$dir/munge"
    # a key of this cluster's own: the machine's munge (if any) is left alone
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed" \
        || die "munged did not start (see $dir/log/munged.log)"
    wait_for 10 "munged did not open its socket" test -S "$dir/munge/munge.socket"

    local cpus mem_mb
    cpus=$(nproc)
    # a bit below the machine's memory: slurmd drains a node that has less than configured
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat >"$dir/slurm.conf" <<EOF
ClusterName=bigcare-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MessageTimeout=10
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    # -i: ignore state of an earlier cluster in this folder; both write their pid files
    slurmctld -i -L "$dir/log/slurmctld.log" || die "slurmctld did not start (see $dir/log/slurmctld.log)"
    slurmd -N localhost -L "$dir/log/slurmd.log" || die "slurmd did not start (see $dir/log/slurmd.log)"
    wait_for 30 "sinfo did not show the node idle (see $dir/log/)" \
        bash -c '[ "$(sinfo -h -n localhost -o %T)" = idle ]'
    echo "SLURM_CONF=$SLURM_CONF"
}

stop() {
    local dir
    dir=$(cd "$1" && pwd)
    if [ -f "$dir/slurm.conf" ]; then
        SLURM_CONF="$dir/slurm.conf" scancel --partition=debug >/dev/null 2>&1 || true
    fi
    for daemon in slurmd slurmctld munge; do
        local pidfile="$dir/$daemon.pid"
        [ -f "$pidfile" ] || continue
        local pid
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

case "${1:-}" in
    install) install ;;
    start) [ $# = 2 ] || die "usage: $0 start DIR"; start "$2" ;;
    stop) [ $# = 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
    *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
