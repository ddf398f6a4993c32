#!/usr/bin/env bash
# Tear down the one-node SLURM cluster started by up.sh.
#
# Cancels every job (so no slurmstepd or job process is left), then stops slurmd, slurmctld,
# slurmdbd, MariaDB and munged through the pid files under $QLORA_SLURM_DIR (default
# /tmp/qlora-slurm): SIGTERM, a bounded wait, SIGKILL if needed. munged is stopped only if up.sh
# started it. Idempotent: with nothing running it says so and exits 0.
#   --purge   also delete $QLORA_SLURM_DIR (config, state, accounting DB, logs)
set -uo pipefail

DIR="${QLORA_SLURM_DIR:-/tmp/qlora-slurm}"
RUN="$DIR/run"; LOG="$DIR/log"; DB_DIR="$DIR/mysql"; MUNGE_DIR="$DIR/munge"
export SLURM_CONF="$DIR/etc/slurm.conf"
PURGE=0
for a in "$@"; do
  case "$a" in
    --purge) PURGE=1 ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
  esac
done

TAG=slurm-down
DOWN_HINT=""
# shellcheck source=../lib/services.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/services.sh"

# stop NAME PIDFILE COMM SECONDS
stop() {
  local pid
  if pid="$(read_pid "$2" "$3")"; then
    stop_pid "$1" "$pid" "$4"
  else
    say "$1: not running"
  fi
  rm -f "$2"
}

if [[ ! -d "$DIR" ]]; then
  say "nothing to do: $DIR does not exist"
  exit 0
fi

# 1. Cancel all jobs while slurmctld and slurmd are still up, so their processes are cleaned.
if read_pid "$RUN/slurmctld.pid" slurmctld >/dev/null && command -v squeue >/dev/null; then
  jobs="$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
  if [[ -n "${jobs// /}" ]]; then
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 80; i++)); do   # KillWait=5: jobs end within seconds; bounded to 20 s
      [[ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]] && break
      sleep 0.25
    done
    left="$(timeout 5 squeue -h -o '%i %T' 2>/dev/null | tr '\n' ' ')"
    [[ -n "$left" ]] && say "WARNING: jobs still listed after 20 s: $left"
  fi
fi

# 2. Daemons, in reverse order of start (slurmctld before slurmdbd so it can flush accounting).
stop slurmd    "$RUN/slurmd.pid"       slurmd    15
stop slurmctld "$RUN/slurmctld.pid"    slurmctld 15
stop slurmdbd  "$RUN/slurmdbd.pid"     slurmdbd  15
stop mariadb   "$DB_DIR/mariadbd.pid"  mariadbd  30
stop munged    "$MUNGE_DIR/munged.pid" munged    10

# 3. Any slurmstepd (a job step that outlived slurmd) or slurmscriptd (slurmctld's helper, left
#    if slurmctld was SIGKILLed) still there: end it by pid. On this machine only this cluster runs them.
for p in /proc/[0-9]*; do
  comm="$(cat "$p/comm" 2>/dev/null)" || continue
  [[ "$comm" == slurmstepd || "$comm" == slurmscriptd ]] || continue
  pid="${p#/proc/}"
  alive "$pid" || continue
  say "stray $comm pid $pid: $(tr '\0' ' ' <"$p/cmdline" 2>/dev/null)"
  stop_pid "$comm" "$pid" 5
done

if ((PURGE)); then
  rm -rf "$DIR"
  [[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" == "$DIR/etc/slurm.conf" ]] && rm -f /etc/slurm/slurm.conf
  say "removed $DIR"
fi

if ((failed)); then
  say "FAILED: some daemon could not be stopped (logs under $LOG)"
  exit 1
fi
say "SLURM down"
