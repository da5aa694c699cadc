#!/usr/bin/env bash
# A real SLURM cluster on this one machine, to try the cluster path locally (and for the SLURM tests):
# munge + slurmctld + two slurmd daemons acting as the nodes n1 and n2, from Debian's packages, no systemd.
#
#   apt-get install slurmctld slurmd slurm-client munge   # once, as root (as are start and stop)
#   launch/slurm/local_cluster.sh start         # idempotent; returns once both nodes are idle
#   launch/slurm/local_cluster.sh status        # sinfo + squeue; exit status 0 when the cluster answers
#   launch/slurm/local_cluster.sh stop          # cancels the queued jobs, stops the daemons
#
# Partitions: `debug` (node n1, the default) and `multi` (n1 and n2: two "nodes" for multi-node jobs). Each
# node offers all CPUs of the machine (the two nodes share them). Needs root: it writes /etc/slurm/slurm.conf
# (refusing to replace one it did not write, unless FORCE=1), adds n1/n2 to /etc/hosts when they do not resolve
# and starts the daemons. Works without cgroups (proctrack/linuxproc, task/none), e.g. in a container.
# Environment: CRED_EXPIRE (seconds, default 10; also how long a requeued job waits before it may start again,
# slurm.conf(5) AuthInfo), PORT_BASE (default 6817, SLURM's own: slurmctld PORT_BASE, nodes PORT_BASE+1 and +2;
# keep it outside 15000-24999, where Lightning puts a job's MASTER_PORT: 15000 + last 4 digits of the job id),
# NODE_CPUS (default: nproc), NODE_MEMORY_MB (default: half the machine's memory).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by manifoldnorm launch/slurm/local_cluster.sh"
NODES=(n1 n2)
CRED_EXPIRE=${CRED_EXPIRE:-10}
PORT_BASE=${PORT_BASE:-6817}
NODE_CPUS=${NODE_CPUS:-$(nproc)}
NODE_MEMORY_MB=${NODE_MEMORY_MB:-$(awk '/MemTotal/ {print int($2 / 2048)}' /proc/meminfo)}
STATE=/var/lib/slurm
LOGS=/var/log/slurm

die() { echo "local_cluster.sh: $*" >&2; exit 1; }
# alive PIDFILE NAME: the pid file names a running (not zombie) process called NAME
alive() {
  local pid state
  pid=$(cat "$1" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) && [[ $state != Z ]]
}

# stop_daemon PIDFILE NAME: SIGTERM, up to 15 s, then SIGKILL
stop_daemon() {
  local i pid
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  kill "$pid"
  for ((i = 0; i < 75; i++)); do alive "$1" "$2" || break; sleep 0.2; done
  if alive "$1" "$2"; then kill -9 "$pid"; sleep 0.5; fi
  rm -f "$1"
}

require_root() { [[ $(id -u) == 0 ]] || die "run as root (writes $CONF and /etc/hosts, starts daemons)"; }

require_packages() {
  local missing=()
  for cmd in munged slurmctld slurmd sinfo sbatch scontrol; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  ((${#missing[@]} == 0)) || die "missing ${missing[*]}: apt-get install slurmctld slurmd slurm-client munge"
}

write_conf() {
  local host
  host=$(hostname -s)
  if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF" && [[ ${FORCE:-0} != 1 ]]; then
    die "$CONF exists and was not written by this script; set FORCE=1 to replace it"
  fi
  mkdir -p "$(dirname "$CONF")"
  cat >"$CONF.new" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT_BASE
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=$CRED_EXPIRE
SlurmUser=root
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=10
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT_BASE + 1)) CPUs=$NODE_CPUS RealMemory=$NODE_MEMORY_MB State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT_BASE + 2)) CPUs=$NODE_CPUS RealMemory=$NODE_MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=n1 Default=YES MaxTime=INFINITE State=UP
PartitionName=multi Nodes=n1,n2 MaxTime=INFINITE State=UP
EOF
  if [[ -f $CONF ]] && cmp -s "$CONF" "$CONF.new"; then rm "$CONF.new"; return 1; fi   # unchanged
  mv "$CONF.new" "$CONF"
}

resolve_names() {
  local name
  for name in "$(hostname -s)" "${NODES[@]}"; do
    getent hosts "$name" >/dev/null || echo "127.0.0.1 $name" >>/etc/hosts
  done
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  munge_works && return 0   # ours or a system munged: either will do
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- munged
  munge_works || die "munge does not work (see /var/log/munge/munged.log)"
}

start_slurm() {
  local changed=$1 node
  mkdir -p "$STATE/slurmctld" "$LOGS"
  for node in "${NODES[@]}"; do mkdir -p "$STATE/slurmd/$node"; done
  if ((changed)); then   # a new node or port needs fresh daemons (scontrol reconfigure does not add nodes)
    for node in "${NODES[@]}"; do stop_daemon "/run/slurmd-$node.pid" slurmd; done
    stop_daemon /run/slurmctld.pid slurmctld
  fi
  alive /run/slurmctld.pid slurmctld || slurmctld || die "slurmctld did not start; see $LOGS/slurmctld.log"
  for node in "${NODES[@]}"; do
    alive "/run/slurmd-$node.pid" slurmd || slurmd -N "$node" || die "slurmd -N $node did not start; see $LOGS/slurmd-$node.log"
  done
}

wait_idle() {
  local i states
  for ((i = 0; i < 60; i++)); do
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
    if [[ $(grep -cE ' (idle|mixed|allocated)$' <<<"$states") == "${#NODES[@]}" ]]; then
      echo "local SLURM cluster up:"; sinfo; return 0
    fi
    if grep -qE ' (down|drained|draining)\*?$' <<<"$states"; then
      scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME 2>/dev/null || true
    fi
    sleep 1
  done
  echo "$states" >&2
  die "nodes not idle after 60 s; logs in $LOGS/"
}

start() {
  require_root
  require_packages
  local changed=0
  write_conf && changed=1
  resolve_names
  start_munge
  start_slurm "$changed"
  wait_idle
}

stop() {
  require_root
  local node i jobs
  # Jobs first: their processes (slurmstepd and the tasks) would outlive the daemons.
  jobs=$(alive /run/slurmctld.pid slurmctld && squeue -h -o %A 2>/dev/null | sort -u || true)
  if [[ -n $jobs ]]; then
    echo "cancelling the jobs in the queue:"; squeue
    # shellcheck disable=SC2086
    scancel $jobs || true
    for ((i = 0; i < 30; i++)); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 1; done
  fi
  for node in "${NODES[@]}"; do stop_daemon "/run/slurmd-$node.pid" slurmd; done
  stop_daemon /run/slurmctld.pid slurmctld
  stop_daemon /run/munge/munged.pid munged
  echo "local SLURM cluster stopped"
}

status() {
  command -v sinfo >/dev/null || die "slurm-client is not installed"
  sinfo && squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
