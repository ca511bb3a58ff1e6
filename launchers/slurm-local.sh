#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for development and CI (Debian 12 slurm-wlm 22.05, run as root,
# no systemd, no cgroups). It is a test cluster: jobs run as root on localhost, nothing is isolated.
#
#   launchers/slurm-local.sh install   apt-get install slurm-wlm munge slurmdbd mariadb-server (skipped when present)
#   launchers/slurm-local.sh start     write /etc/slurm configs; start munged, mariadbd, slurmdbd, slurmctld, slurmd;
#                                      wait until the node is idle. Daemons already running are left alone.
#   launchers/slurm-local.sh up        install + start (what CI and the tests call)
#   launchers/slurm-local.sh stop      stop the daemons (by their pid files), in reverse order
#   launchers/slurm-local.sh restart   stop + start (needed after changing a HS_SLURM_* setting)
#   launchers/slurm-local.sh status    daemons and sinfo; exit 0 only when the node answers and accepts jobs
#
# Settings (environment):
#   HS_SLURM_PARTITION=debug     name of the default partition
#   HS_SLURM_ACCOUNTING=1        slurmdbd + MariaDB so that `sacct` works. Keep it: submitit asks sacct for the state
#                                of jobs that died without a result (OOM kill, scancel, node failure); without it
#                                a Hydra sweep waits forever for such a job. 0 = accounting_storage/none.
#   HS_SLURM_GPUS=2              N>0: N fake GPUs (char devices made with mknod, major 195) as GRES gpu on the node and
#                                a partition "gpu", so --gres=gpu:k / --gpus-per-node=k jobs can be scheduled
#                                (they get CUDA_VISIBLE_DEVICES; there is no real GPU behind it). 0: no GPUs.
#   HS_SLURM_MEM_FRACTION=0.85   fraction of the memory slurmd detects that the node offers (RealMemory must not
#                                exceed what slurmd detects, or the node is drained as "Low RealMemory").
# Logs: /var/log/slurm/{slurmctld,slurmd,slurmdbd,mariadbd}.log
set -euo pipefail

PARTITION=${HS_SLURM_PARTITION:-debug}
ACCOUNTING=${HS_SLURM_ACCOUNTING:-1}
GPUS=${HS_SLURM_GPUS:-2}
MEM_FRACTION=${HS_SLURM_MEM_FRACTION:-0.85}

CONF=/etc/slurm
LOGDIR=/var/log/slurm
SPOOL_CTLD=/var/spool/slurmctld
SPOOL_D=/var/spool/slurmd
FAKEGPU=/run/slurm-local-gpus
NODE=$(hostname -s)
CLUSTER=localcluster
DB_PASS=slurm-local   # a local test database on 127.0.0.1 only

PIDS=(/run/munge/munged.pid /run/mysqld/mysqld.pid /run/slurmdbd.pid /run/slurmctld.pid /run/slurmd.pid)

say() { echo "[slurm-local] $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts system daemons)"; }

# wait_until SECONDS CMD...: poll CMD every 0.2 s until it succeeds
wait_until() {
  local limit=$1; shift
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { say "gave up after ${limit}s waiting for: $*"; return 1; }
    sleep 0.2
  done
}

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

packages() {
  local p=(slurm-wlm munge)
  [[ $ACCOUNTING == 1 ]] && p+=(slurmdbd mariadb-server)
  echo "${p[@]}"
}

installed() {
  local bins=(munged slurmctld slurmd sinfo sbatch sacct)
  [[ $ACCOUNTING == 1 ]] && bins+=(slurmdbd mariadbd)
  local b
  for b in "${bins[@]}"; do command -v "$b" >/dev/null || [[ -x /usr/sbin/$b ]] || return 1; done
}

cmd_install() {
  need_root
  if installed; then say "packages already installed"; return 0; fi
  command -v apt-get >/dev/null || die "apt-get not found: install $(packages) by hand"
  # Keep postinst scripts from starting the daemons (no systemd here; `start` runs them itself). Containers usually
  # ship such a policy-rc.d already; add a temporary one only where there is none.
  local policy=/usr/sbin/policy-rc.d added=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added=1
  fi
  local rc=0 aptlog
  aptlog=$(mktemp /tmp/slurm-local-install.XXXXXX.log)
  say "apt-get install $(packages) (log: $aptlog)"
  {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq &&
      apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 $(packages)
  } >"$aptlog" 2>&1 || rc=$?
  ((added)) && rm -f "$policy"
  ((rc == 0)) || { tail -n 30 "$aptlog" >&2; die "apt-get failed (rc=$rc), full log: $aptlog"; }
  rm -f "$aptlog"
  installed || die "packages installed but binaries missing"
  say "installed: $(packages)"
}

# RealMemory in MB: a fraction of what slurmd itself detects (falls back to /proc/meminfo)
real_memory() {
  local detected
  detected=$(/usr/sbin/slurmd -C 2>/dev/null | tr ' ' '\n' | sed -n 's/^RealMemory=//p' | head -1)
  [[ $detected =~ ^[0-9]+$ ]] || detected=$(awk '/^MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  awk -v m="$detected" -v f="$MEM_FRACTION" 'BEGIN {print int(m * f)}'
}

write_configs() {
  mkdir -p "$CONF" "$LOGDIR" "$SPOOL_CTLD" "$SPOOL_D"
  local cpus mem accounting gres="" node_gres="" gpu_partition=""
  cpus=$(nproc)
  mem=$(real_memory)
  if [[ $ACCOUNTING == 1 ]]; then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
  else
    accounting="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  if ((GPUS > 0)); then
    gres="GresTypes=gpu
AccountingStorageTRES=gres/gpu"
    node_gres="Gres=gpu:$GPUS"
    gpu_partition="PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP"
  fi
  cat >"$CONF/slurm.conf.new" <<EOF
# written by launchers/slurm-local.sh: single-node test cluster, no cgroups
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
# cgroups are not usable in this container: track processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$accounting
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it a job that asks no memory gets the whole node and jobs run one at a time
DefMemPerCPU=1024
ReturnToService=2
JobRequeue=1
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SPOOL_CTLD
SlurmdSpoolDir=$SPOOL_D
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$gres
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $node_gres State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
$gpu_partition
EOF
  if running /run/slurmctld.pid; then   # leave the running cluster's configuration alone
    cmp -s "$CONF/slurm.conf" "$CONF/slurm.conf.new" ||
      say "warning: these settings differ from the running cluster's; run '$0 restart' to apply them"
    rm -f "$CONF/slurm.conf.new"
    return 0
  fi
  if ((GPUS > 0)); then
    # gres/gpu needs File= entries that are character devices: regular files and File-less GPUs are rejected
    mkdir -p "$FAKEGPU"
    local i
    for ((i = 0; i < GPUS; i++)); do [[ -c $FAKEGPU/nvidia$i ]] || mknod "$FAKEGPU/nvidia$i" c 195 "$i"; done
    echo "NodeName=$NODE Name=gpu File=$FAKEGPU/nvidia[0-$((GPUS - 1))]" >"$CONF/gres.conf"
  else
    rm -f "$CONF/gres.conf"
  fi
  mv "$CONF/slurm.conf.new" "$CONF/slurm.conf"
  if [[ $ACCOUNTING == 1 ]]; then
    (
      umask 077   # slurmdbd refuses a slurmdbd.conf that group or others can read
      cat >"$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOGDIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DB_PASS
EOF
    )
    chmod 600 "$CONF/slurmdbd.conf"
  fi
}

start_munge() {
  if [[ ! -s /etc/munge/munge.key ]]; then   # the package's postinst makes one; recreate it if it was deleted
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge   # systemd's RuntimeDirectory would make it
  # munged refuses to run as root ("PRNG seed dir is insecure"): run it as its own user; it daemonizes
  running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
  wait_until 10 bash -c 'munge -n | unmunge'
}

start_accounting() {
  install -d -o mysql -g mysql -m 755 /run/mysqld
  if [[ ! -d /var/lib/mysql/mysql ]]; then   # data directory missing (normally made by the package's postinst)
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  if ! running /run/mysqld/mysqld.pid; then
    setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file=/run/mysqld/mysqld.pid \
      >>"$LOGDIR/mariadbd.log" 2>&1 </dev/null &
  fi
  wait_until 60 mysqladmin ping
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
            ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  running /run/slurmdbd.pid || /usr/sbin/slurmdbd
  wait_until 30 sacctmgr -n list cluster
  # `sacctmgr add` fails when the cluster exists, and the default listing cuts the name: check with -P first
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

# the node takes jobs: idle, mixed or allocated (not completing, draining, drained, down, or not responding: idle*)
node_ready() { sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -qxE '(idle|mixed|allocated)'; }

cmd_start() {
  need_root
  installed || die "SLURM is not installed: run '$0 install' (or '$0 up')"
  local t0=$SECONDS
  write_configs
  start_munge
  [[ $ACCOUNTING == 1 ]] && start_accounting
  running /run/slurmctld.pid || /usr/sbin/slurmctld
  wait_until 30 scontrol ping
  running /run/slurmd.pid || /usr/sbin/slurmd
  # A node left DOWN or DRAINED (bad earlier settings, "Kill task failed") stays so, since slurmctld saves its state
  # in $SPOOL_CTLD: resume it. Jobs recovered in COMPLETING state keep it busy until slurmd has cleaned them up.
  local deadline=$((SECONDS + 90)) resumed=0 state
  until node_ready; do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    if ((!resumed)) && [[ $state =~ ^(drain|down|fail) ]]; then
      say "node $NODE is $state ($(sinfo -h -n "$NODE" -o %E 2>/dev/null)): resuming it"
      scontrol update nodename="$NODE" state=resume 2>/dev/null || true
      resumed=1
    fi
    ((SECONDS < deadline)) || { sinfo -R >&2 || true; die "node $NODE did not come up (see $LOGDIR/slurmd.log)"; }
    sleep 0.2
  done
  say "up in $((SECONDS - t0))s: partition '$PARTITION' on node $NODE ($(nproc) CPUs, $(real_memory) MB$( ((GPUS > 0)) && echo ", $GPUS fake GPUs in partition 'gpu'"))"
  sinfo >&2
}

# stop_all PIDFILE...: SIGTERM to each, then wait for all of them (SIGKILL after 15 s)
stop_all() {
  local pf pids=() pid i
  for pf in "$@"; do
    if running "$pf"; then
      pid=$(cat "$pf"); pids+=("$pid")
      say "stopping $(basename "$pf" .pid) (pid $pid)"
      kill "$pid" 2>/dev/null || true
    fi
  done
  for ((i = 0; i < 75; i++)); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then say "pid $pid still alive after 15 s: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
  done
  for pf in "$@"; do running "$pf" || rm -f "$pf"; done
}

# Jobs still running when slurmd stops would go on as orphans, and steps that cannot report to a stopped slurmctld
# end as "Kill task failed", which drains the node: cancel every job and let it finish first (a test cluster).
cancel_jobs() {
  running /run/slurmctld.pid && scontrol ping 2>/dev/null | grep -q 'is UP' || return 0
  local jobs
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  [[ -n ${jobs// /} ]] || return 0
  say "cancelling jobs: $jobs"
  # shellcheck disable=SC2086
  scancel $jobs 2>/dev/null || true
  wait_until 60 bash -c '[[ -z $(squeue -h -o %A 2>/dev/null) ]]' || say "jobs still listed after 60 s: stopping anyway"
}

cmd_stop() {
  need_root
  cancel_jobs
  # the Slurm daemons first (slurmctld hands its last accounting records to slurmdbd), then what they used
  stop_all /run/slurmd.pid /run/slurmctld.pid
  stop_all /run/slurmdbd.pid /run/mysqld/mysqld.pid /run/munge/munged.pid
}

cmd_status() {
  local pf ok=0
  for pf in "${PIDS[@]}"; do
    if running "$pf"; then printf 'up    %-10s pid %s\n' "$(basename "$pf" .pid)" "$(cat "$pf")"
    else printf 'down  %s\n' "$(basename "$pf" .pid)"; fi
  done
  if command -v sinfo >/dev/null && node_ready; then
    sinfo
    sacct -n -X -S now >/dev/null 2>&1 && echo "sacct: works" || echo "sacct: not available (accounting off or slurmdbd down)"
  else
    echo "cluster: not ready"; ok=3
  fi
  return $ok
}

case ${1:-} in
  install) cmd_install ;;
  start) cmd_start ;;
  up) cmd_install && cmd_start ;;
  stop) cmd_stop ;;
  restart) cmd_stop && cmd_start ;;
  status) cmd_status ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
