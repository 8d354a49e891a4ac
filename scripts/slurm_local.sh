#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for kiln's tests and demos.
#
#   scripts/slurm_local.sh start    # install (Debian, as root) if missing, start munge+slurmctld+slurmd
#   scripts/slurm_local.sh status   # exit 0 when the node answers, else 1
#   scripts/slurm_local.sh stop     # stop the daemons this script started (by PID)
#
# Idempotent: `start` on a running cluster only prints the export line again.
# The last line of `start` is `export SLURM_CONF=...`; eval it (or export it) before sbatch/squeue.
# Settings: KILN_SLURM_DIR (state, default /tmp/kiln-slurm), KILN_SLURM_PORT (slurmctld port, default 6817;
# slurmd uses the next one), KILN_SLURM_CRED_EXPIRE (requeued jobs wait this long, default 5 s).
set -euo pipefail

DIR=${KILN_SLURM_DIR:-/tmp/kiln-slurm}
CONF=$DIR/slurm.conf
PORT=${KILN_SLURM_PORT:-6817}
CRED_EXPIRE=${KILN_SLURM_CRED_EXPIRE:-5}
HOST=$(hostname -s)
export SLURM_CONF=$CONF

log() { echo "slurm_local: $*" >&2; }
die() { log "$*"; exit 1; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged; do
        command -v "$cmd" >/dev/null 2>&1 || [[ -x /usr/sbin/$cmd ]] || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root to install, or: apt-get install slurmctld slurmd slurm-client munge"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >&2
}

start_munge() {
    # Reuse a munged that already answers (system service or an earlier start).
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    [[ -f /etc/munge/munge.key ]] || { /usr/sbin/mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$DIR/munged.pid" 2>/dev/null || true
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged did not start"
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    chmod 755 "$DIR"
    chown slurm:slurm "$DIR/state" "$DIR/log"
    # `slurmd -C` reports this machine's real CPUs/sockets/memory, so the node never drains
    # for claiming more than it has.
    local node
    node=$(slurmd -C | head -n 1)
    cat >"$CONF" <<EOF
# Written by kiln scripts/slurm_local.sh
ClusterName=kiln-local
SlurmctldHost=$HOST
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MinJobAge=300
KillWait=10
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

node_ready() { sinfo -h -N -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

start() {
    install_packages
    mkdir -p "$DIR"
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_ready; then
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    start_munge
    alive "$DIR/slurmctld.pid" || alive "$DIR/slurmd.pid" || write_conf
    # -i: ignore state from an earlier cluster in this directory (fresh job ids are fine for tests)
    if ! alive "$DIR/slurmctld.pid"; then
        : >"$DIR/log/jobcomp.txt"  # job ids restart at 1: drop records of an earlier cluster
        chown slurm:slurm "$DIR/log/jobcomp.txt"
        slurmctld -i
    fi
    alive "$DIR/slurmd.pid" || slurmd
    for _ in $(seq 150); do
        if node_ready; then
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.1
    done
    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    node_ready && { echo "export SLURM_CONF=$CONF"; return 0; }
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "node $HOST did not become idle (logs in $DIR/log)"
}

stop_pid() {
    local f=$1
    alive "$f" || { rm -f "$f"; return 0; }
    local pid
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
}

stop() {
    stop_pid "$DIR/slurmd.pid"
    stop_pid "$DIR/slurmctld.pid"
    stop_pid "$DIR/munged.pid"  # only when this script started munged
    log "stopped"
}

status() {
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_ready; then
        sinfo
        echo "export SLURM_CONF=$CONF"
    else
        log "not running (state in $DIR)"
        return 1
    fi
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
