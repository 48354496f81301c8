#!/usr/bin/env bash
# A real single-node SLURM on 127.0.0.1 for testing cluster submission (Debian, root).
#   scripts/slurm-local.sh start   # install if needed, start munged + slurmctld + slurmd, wait idle
#   scripts/slurm-local.sh stop    # stop every daemon this script started, by pid
# Facts this relies on: no cgroups here (proctrack/linuxproc, task/none); the config must be at
# /etc/slurm/slurm.conf (the executor plugin's job step drops SLURM_CONF); no accounting daemon,
# so profiles use `slurm-status-command: squeue` and `slurm-no-account: true`; PID 1 may not
# reap, so a stopped daemon can linger as a zombie (state Z counts as stopped).
set -euo pipefail
WORK="${SCD_SLURM_WORK:-/tmp/scd-slurm}"
PARTITION="${SCD_SLURM_PARTITION:-debug}"
cmd="${1:-}"

alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1; [[ "$st" != Z* ]]; }
stop_pid() {
  local pid="$1"; [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 60); do alive "$pid" || return 0; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null || true
}

stop_all() {
  for daemon in slurmd slurmctld munged; do
    if [ -s "$WORK/run/$daemon.pid" ]; then
      stop_pid "$(cat "$WORK/run/$daemon.pid")"
      rm -f "$WORK/run/$daemon.pid"
    fi
  done
}

start_all() {
  if [ "$(id -u)" != 0 ]; then echo "slurm-local: needs root (apt-get, /etc/slurm)" >&2; exit 3; fi
  local pkgs="slurmctld slurmd slurm-client munge"
  if ! dpkg -s $pkgs >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  fi
  stop_all
  rm -rf "$WORK"; mkdir -p "$WORK"/{state,spool,log,run}

  # munge: its own daemon, as the munge user, with a pid file we own.
  mkdir -p /run/munge /etc/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  chown munge:munge "$WORK/run"
  runuser -u munge -- /usr/sbin/munged --pid-file="$WORK/run/munged.pid" \
      --socket=/run/munge/munge.socket.2 --force
  chown root:root "$WORK/run"
  munge -n | unmunge >/dev/null

  local host cpus mem
  host=$(hostname -s); cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it follows OMP_NUM_THREADS
  mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p /etc/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=scdlocal
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
MinJobAge=600
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${WORK}/state
SlurmdSpoolDir=${WORK}/spool
SlurmctldPidFile=${WORK}/run/slurmctld.pid
SlurmdPidFile=${WORK}/run/slurmd.pid
SlurmctldLogFile=${WORK}/log/slurmctld.log
SlurmdLogFile=${WORK}/log/slurmd.log
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld -i
  slurmd
  for _ in $(seq 1 120); do
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break; sleep 0.25
  done
  if [ "$(sinfo -h -o %T 2>/dev/null)" != idle ]; then
    echo "slurm-local: node did not become idle; see $WORK/log" >&2; stop_all; exit 1
  fi
  echo "slurm-local: up (partition $PARTITION, work $WORK)"
}

case "$cmd" in
  start) start_all ;;
  stop) stop_all; echo "slurm-local: stopped" ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
