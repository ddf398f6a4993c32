#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster on this machine (for tests and CI).
#
#   munge -> MariaDB (127.0.0.1:3307) -> slurmdbd -> cluster registered -> slurmctld -> slurmd
#
# One node named $(hostname -s) with 2 fake GPUs (gres gpu:2, files are symlinks to /dev/null),
# one partition "debug" (default). All config, state, logs and pid files live under
# $QLORA_SLURM_DIR (default /tmp/qlora-slurm); /etc/slurm/slurm.conf is made a symlink to the
# config there so that plain `sbatch`/`sinfo`/submitit find it without SLURM_CONF.
#
# Idempotent: if the cluster is already up and healthy it says so and exits 0; otherwise it starts
# only what is not running. Every wait is bounded (QLORA_SLURM_TIMEOUT seconds, default 60); on
# failure it exits non-zero with the relevant log tail. See README.md next to this file.
set -Eeuo pipefail

DIR="${QLORA_SLURM_DIR:-/tmp/qlora-slurm}"
TIMEOUT="${QLORA_SLURM_TIMEOUT:-60}"
CLUSTER="qlora"
MYSQL_PORT=3307
HOST="$(hostname -s)"

ETC="$DIR/etc"; RUN="$DIR/run"; LOG="$DIR/log"; MUNGE_DIR="$DIR/munge"
DB_DIR="$DIR/mysql"; DB_DATA="$DB_DIR/data"; DB_SOCK="$DB_DIR/mysqld.sock"
export SLURM_CONF="$ETC/slurm.conf"
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

TAG=slurm-up
DOWN_HINT="logs under $LOG; scripts/slurm/down.sh stops what was started"
# shellcheck source=../lib/services.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/services.sh"
trap 'rc=$?; echo "[slurm-up] ERROR: command failed (rc=$rc) at line $LINENO: $BASH_COMMAND" >&2; exit $rc' ERR

munge_ok() { timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; }
db_ok() { timeout 10 mariadb-admin --no-defaults --socket="$DB_SOCK" -u root ping; }
dbd_ok() { timeout 10 sacctmgr -n list cluster; }
sacct_ok() { timeout 10 sacct -n -X -a -S now-1minutes; }
node_state() { timeout 10 sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1 | tr -d '*~#!%$@^-'; }
node_up() { [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]; }

healthy() {
  command -v slurmctld >/dev/null 2>&1 || return 1
  [[ -f "$SLURM_CONF" ]] || return 1
  pid_alive "$RUN/slurmctld.pid" slurmctld && pid_alive "$RUN/slurmd.pid" slurmd \
    && pid_alive "$RUN/slurmdbd.pid" slurmdbd && pid_alive "$DB_DIR/mariadbd.pid" mariadbd \
    && munge_ok && node_up && sacct_ok >/dev/null 2>&1
}

if healthy; then
  say "SLURM already up and healthy (node $HOST: $(node_state), dir $DIR); nothing to do"
  say "bring-up took $(elapsed)s (already up)"
  exit 0
fi

# ---------------------------------------------------------------- packages
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  mkdir -p "$LOG"
  timeout 600 apt-get update -q >"$LOG/apt.log" 2>&1 || die "apt-get update failed" "$LOG/apt.log"
  # The packages' own scripts cannot start services here (policy-rc.d): we start them below.
  timeout 900 apt-get install -y -q --no-install-recommends "${PKGS[@]}" >>"$LOG/apt.log" 2>&1 \
    || die "apt-get install failed" "$LOG/apt.log"
  say "packages installed"
fi

# ---------------------------------------------------------------- folders and config
mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/state/slurmctld" "$DIR/spool/slurmd" "$DIR/dev" "$DB_DIR" "$MUNGE_DIR"
chown munge:munge "$MUNGE_DIR"; chmod 700 "$MUNGE_DIR"

# Fake GPUs: gres File= must be character devices, so symlinks to /dev/null.
for i in 0 1; do ln -sfn /dev/null "$DIR/dev/nvidia$i"; done

ncpu="$(nproc)"
mem_mb="$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.75 }' /proc/meminfo)"

# write_if_changed FILE: stdin to FILE, only when the content differs (keeps mtimes stable).
write_if_changed() {
  local tmp; tmp="$(mktemp "$1.XXXXXX")"
  cat >"$tmp"
  if [[ -f "$1" ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; fi
}

write_if_changed "$ETC/slurm.conf" <<EOF
# Written by scripts/slurm/up.sh: one-node test cluster, everything under $DIR.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
KillWait=5
InactiveLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

write_if_changed "$ETC/gres.conf" <<EOF
AutoDetect=off
NodeName=$HOST Name=gpu File=$DIR/dev/nvidia[0-1]
EOF
# mktemp made them mode 600: clients of any user must be able to read slurm.conf.
chmod 644 "$ETC/slurm.conf" "$ETC/gres.conf"

# Password of the loopback-only MariaDB user "slurm": made once, kept in the folder.
[[ -s "$DB_DIR/slurm.pass" ]] || (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_DIR/slurm.pass")
chmod 600 "$DB_DIR/slurm.pass"
DB_PASS="$(cat "$DB_DIR/slurm.pass")"

# slurmdbd refuses a slurmdbd.conf that is not mode 600 and owned by SlurmUser (root).
(umask 077; write_if_changed "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)
chown root:root "$ETC/slurmdbd.conf"; chmod 600 "$ETC/slurmdbd.conf"

# Clients (sbatch, sinfo, sacct, submitit) read /etc/slurm/slurm.conf unless SLURM_CONF is set.
mkdir -p /etc/slurm
if [[ -e /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]]; then
  say "WARNING: /etc/slurm/slurm.conf is a real file, left alone: clients need SLURM_CONF=$SLURM_CONF"
else
  ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf
fi

# ---------------------------------------------------------------- munge
if munge_ok; then
  say "munge: already answering"
else
  [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key; }
  chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
  mkdir -p /run/munge; chown munge:munge /run/munge; chmod 755 /run/munge
  rm -f "$MUNGE_DIR/munged.pid"
  su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$MUNGE_DIR/munged.pid --log-file=$MUNGE_DIR/munged.log --seed-file=$MUNGE_DIR/munged.seed" \
    </dev/null >>"$LOG/munged.out" 2>&1 || die "munged did not start" "$LOG/munged.out" "$MUNGE_DIR/munged.log"
  wait_for "$TIMEOUT" "munge -n | unmunge" munge_ok || die "munge does not answer" "$LOG/munged.out" "$MUNGE_DIR/munged.log"
  # Our pid file lives where munged (user munge) can write; down.sh uses it.
  say "munge: started (pid $(cat "$MUNGE_DIR/munged.pid" 2>/dev/null || echo '?'))"
fi

# ---------------------------------------------------------------- MariaDB (loopback, port 3307)
if pid_alive "$DB_DIR/mariadbd.pid" mariadbd; then
  wait_for "$TIMEOUT" "mariadb ping on $DB_SOCK" db_ok || die "MariaDB runs but does not answer" "$LOG/mariadb.log"
  say "mariadb: already running"
else
  if [[ ! -d "$DB_DATA/mysql" ]]; then
    rm -rf "$DB_DATA"
    timeout 120 mariadb-install-db --no-defaults --user=root --datadir="$DB_DATA" \
      --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed" "$LOG/mariadb-install.log"
  fi
  rm -f "$DB_DIR/mariadbd.pid"
  setsid -f mariadbd --no-defaults --user=root --datadir="$DB_DATA" --socket="$DB_SOCK" \
    --pid-file="$DB_DIR/mariadbd.pid" --bind-address=127.0.0.1 --port="$MYSQL_PORT" \
    --log-error="$LOG/mariadb.log" --skip-name-resolve --skip-log-bin \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --innodb-use-native-aio=0 </dev/null >>"$LOG/mariadb.out" 2>&1
  wait_for "$TIMEOUT" "mariadb ping on $DB_SOCK" db_ok || die "MariaDB did not come up" "$LOG/mariadb.out" "$LOG/mariadb.log"
  wait_for 10 "mariadbd pid file" pid_alive "$DB_DIR/mariadbd.pid" mariadbd || die "MariaDB wrote no pid file" "$LOG/mariadb.log"
  say "mariadb: started on 127.0.0.1:$MYSQL_PORT (pid $(cat "$DB_DIR/mariadbd.pid"))"
fi
# slurmdbd connects over TCP to 127.0.0.1: with skip-name-resolve that is 'slurm'@'127.0.0.1'.
mariadb --no-defaults --socket="$DB_SOCK" -u root >"$LOG/mariadb-setup.log" 2>&1 <<EOF || die "could not create the slurm database user" "$LOG/mariadb-setup.log"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

# ---------------------------------------------------------------- slurmdbd + cluster
if pid_alive "$RUN/slurmdbd.pid" slurmdbd; then
  say "slurmdbd: already running"
else
  rm -f "$RUN/slurmdbd.pid"
  slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1 || die "slurmdbd did not start" "$LOG/slurmdbd.out" "$LOG/slurmdbd.log"
fi
wait_for "$TIMEOUT" "sacctmgr -n list cluster" dbd_ok || die "slurmdbd does not answer" "$LOG/slurmdbd.out" "$LOG/slurmdbd.log" "$LOG/mariadb.log"
say "slurmdbd: answering (pid $(cat "$RUN/slurmdbd.pid" 2>/dev/null || echo '?'))"
if ! timeout 10 sacctmgr -n -P list cluster format=Cluster | grep -qx "$CLUSTER"; then
  timeout 20 sacctmgr -i add cluster "$CLUSTER" >>"$LOG/sacctmgr.log" 2>&1 \
    || die "sacctmgr add cluster $CLUSTER failed" "$LOG/sacctmgr.log" "$LOG/slurmdbd.log"
  say "cluster $CLUSTER registered"
fi

# ---------------------------------------------------------------- slurmctld, slurmd
if pid_alive "$RUN/slurmctld.pid" slurmctld; then
  say "slurmctld: already running"
else
  rm -f "$RUN/slurmctld.pid"
  slurmctld </dev/null >>"$LOG/slurmctld.out" 2>&1 || die "slurmctld did not start" "$LOG/slurmctld.out" "$LOG/slurmctld.log"
  wait_for "$TIMEOUT" "scontrol ping" bash -c 'timeout 5 scontrol ping | grep -q UP' \
    || die "slurmctld does not answer" "$LOG/slurmctld.out" "$LOG/slurmctld.log"
  say "slurmctld: started (pid $(cat "$RUN/slurmctld.pid" 2>/dev/null || echo '?'))"
fi
if pid_alive "$RUN/slurmd.pid" slurmd; then
  say "slurmd: already running"
else
  rm -f "$RUN/slurmd.pid"
  slurmd -N "$HOST" </dev/null >>"$LOG/slurmd.out" 2>&1 || die "slurmd did not start" "$LOG/slurmd.out" "$LOG/slurmd.log"
  wait_for 10 "slurmd pid file" pid_alive "$RUN/slurmd.pid" slurmd || die "slurmd is not running" "$LOG/slurmd.out" "$LOG/slurmd.log"
  say "slurmd: started (pid $(cat "$RUN/slurmd.pid"))"
fi

# ---------------------------------------------------------------- node idle, sacct answers
end=$(( $(date +%s) + TIMEOUT )); resumed=0; state=""
while :; do
  state="$(node_state || true)"
  [[ "$state" =~ ^(idle|mixed|allocated|completing)$ ]] && break
  if [[ "$state" =~ drain|down|fail|inval ]] && (( resumed < 3 )); then
    say "node $HOST is '$state': resuming it"
    timeout 10 scontrol update NodeName="$HOST" State=RESUME >>"$LOG/scontrol.log" 2>&1 || true
    resumed=$((resumed + 1))
  fi
  if (( $(date +%s) >= end )); then
    timeout 10 scontrol show node "$HOST" >>"$LOG/scontrol.log" 2>&1 || true
    die "node $HOST not idle after ${TIMEOUT}s (state '${state:-none}')" "$LOG/scontrol.log" "$LOG/slurmd.log" "$LOG/slurmctld.log"
  fi
  sleep 0.25
done
wait_for "$TIMEOUT" "sacct" sacct_ok || die "sacct does not answer" "$LOG/slurmdbd.log" "$LOG/slurmctld.log"

say "SLURM up: node $HOST $state, gres $(timeout 10 sinfo -h -n "$HOST" -o %G), partition debug; SLURM_CONF=$SLURM_CONF"
say "bring-up took $(elapsed)s"
