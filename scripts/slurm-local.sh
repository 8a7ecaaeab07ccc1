#!/usr/bin/env bash
# A one-node SLURM cluster on this Debian machine, for trying and testing the
# workflow's SLURM profile (workflow/profiles/slurm). Needs root and apt-get.
#
#   scripts/slurm-local.sh start    install (when missing), configure and start munged, slurmctld, slurmd
#   scripts/slurm-local.sh stop     stop the three daemons this script started, remove the config it wrote
#   scripts/slurm-local.sh status   sinfo, or exit 1 when the cluster is not up
# Exit status 3: SLURM is missing and could not be installed.
#
# The node is this host with its real CPU and memory counts (`slurmd -C`). Two
# partitions, `cpu` (default) and `gpu`, as the profile names them; the node
# offers its real GPUs (/dev/nvidia[0-9]*) as `gpu` gres, or, when it has none,
# one stand-in gpu (device file /dev/null), so that the profile's GPU jobs are
# scheduled (they then run on the CPU). Daemons talk over 127.0.0.1, so the host
# name need not resolve (containers).
#
# Accounting: no slurmdbd. The executor plugin then follows its jobs with
# `squeue --states=all`, which lists a finished job for MinJobAge (here 1 h).
# Every finished job is also written to the job completion log
# ($SLURM_LOCAL_JOBCOMP, default /var/log/slurm/jobcomp.log): one line per job
# with its id, name, state and exit code.
set -euo pipefail

CONF_DIR=/etc/slurm
STATE_DIR=${SLURM_LOCAL_STATE:-/var/lib/slurm-local}
LOG_DIR=/var/log/slurm
JOBCOMP=${SLURM_LOCAL_JOBCOMP:-$LOG_DIR/jobcomp.log}
PACKAGES=(munge slurm-wlm slurmctld slurmd slurm-client)

MARK="# Written by scripts/slurm-local.sh"

die() { echo "slurm-local: $*" >&2; exit 1; }
# Exit status 3: SLURM is not installed and cannot be (the test suite skips on it).
cannot_install() { echo "slurm-local: $*" >&2; exit 3; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null && return
    command -v apt-get >/dev/null || cannot_install "apt-get not found: install ${PACKAGES[*]} by hand"
    echo "slurm-local: installing ${PACKAGES[*]} (apt-get)" >&2
    apt-get update -qq || cannot_install "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null ||
        cannot_install "apt-get install ${PACKAGES[*]} failed"
}

gpu_count() {
    local devices=(/dev/nvidia[0-9]*)
    if [ -e "${devices[0]}" ]; then echo "${#devices[@]}"; else echo 0; fi
}

# A slurm.conf this script did not write belongs to a real cluster: never overwrite or remove it.
ours() { [ ! -e "$1" ] || head -1 "$1" | grep -qF "$MARK"; }

write_config() {
    local host node gpus
    ours "$CONF_DIR/slurm.conf" || die "$CONF_DIR/slurm.conf was not written by this script (a real cluster's?); \
move it aside to try the one-node cluster"
    host=$(hostname -s)
    # "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    node=$(slurmd -C | head -1)
    [[ $node == NodeName=* ]] || die "slurmd -C did not describe this node: $node"
    gpus=$(gpu_count)
    mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR"
    if [ "$gpus" -gt 0 ]; then
        printf '%s\nNodeName=%s Name=gpu File=/dev/nvidia[0-%d]\n' "$MARK" "$host" "$((gpus - 1))" >"$CONF_DIR/gres.conf"
    else
        gpus=1
        # slurmd ignores a count-only gpu; /dev/null stands in for the device file.
        printf '%s\nNodeName=%s Name=gpu File=/dev/null\n' "$MARK" "$host" >"$CONF_DIR/gres.conf"
    fi
    cat >"$CONF_DIR/slurm.conf" <<EOF
$MARK: a one-node cluster on this host.
ClusterName=nagl-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP
GresTypes=gpu
${node} NodeAddr=127.0.0.1 Gres=gpu:$gpus State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
EOF
    echo "$CONF_DIR/slurm.conf: ${node#NodeName=}, $gpus gpu" >&2
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if ! munge -n >/dev/null 2>&1; then
        if id munge >/dev/null 2>&1; then
            su -s /bin/sh munge -c "munged --pid-file=/run/munge/munged.pid"
        else
            munged --force --pid-file=/run/munge/munged.pid
        fi
        # Only a munged started here is stopped by `stop`.
        cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
    fi
    munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
}

wait_for_node() {
    for _ in $(seq 60); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then return; fi
        sleep 1
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "the node did not become idle within 60 s"
}

start() {
    [ "$(id -u)" = 0 ] || die "run as root"
    install_packages
    mkdir -p "$STATE_DIR"
    write_config
    # A fresh controller state: no jobs or node reasons left from an earlier start.
    pid_alive "$STATE_DIR/slurmctld.pid" || rm -rf "${STATE_DIR:?}/ctld"/*
    start_munge
    pid_alive "$STATE_DIR/slurmctld.pid" || slurmctld
    pid_alive "$STATE_DIR/slurmd.pid" || slurmd
    wait_for_node
    sinfo
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() {
    local name=$1 pidfile=$2
    pid_alive "$pidfile" || return 0
    local pid
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    echo "slurm-local: $name ($pid) did not stop on SIGTERM; sending SIGKILL" >&2
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    stop_daemon slurmd "$STATE_DIR/slurmd.pid"
    stop_daemon slurmctld "$STATE_DIR/slurmctld.pid"
    stop_daemon munged "$STATE_DIR/munged.pid"
    # Left behind, a config naming a stopped controller makes every SLURM client call wait for it
    # (`scontrol show config` about 9 s), and Snakemake's SLURM plugin calls one whenever it is imported.
    if [ -e "$CONF_DIR/slurm.conf" ] && ours "$CONF_DIR/slurm.conf"; then
        rm -f "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) command -v sinfo >/dev/null && sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
