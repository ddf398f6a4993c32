#!/usr/bin/env bash
# Bring up the two databases the storage tests run sweeps against, on loopback only (for tests and CI):
#
#   PostgreSQL  127.0.0.1:5433  (run as the `postgres` user: it refuses root)  database and role `qlora`
#   MariaDB     127.0.0.1:3308  (its own instance, not SLURM's on 3307)         database and user `qlora`
#
# Everything (data, sockets, logs, pid files, the password) lives under $QLORA_DB_DIR (default /tmp/qlora-db).
# The test role has a password, made once and kept in $QLORA_DB_DIR/password; the two SQLAlchemy URLs are written
# to $QLORA_DB_DIR/urls.env (QLORA_EXP_TEST_POSTGRES_URL=..., QLORA_EXP_TEST_MYSQL_URL=...), which the tests read
# (or `set -a; . /tmp/qlora-db/urls.env; set +a`). This script exports nothing itself.
# The test role may also create databases named qlora* (a test's fresh database).
#
# Idempotent: when both answer with the password it says so and exits 0; otherwise it installs what is missing
# (Debian packages postgresql, mariadb-server) and starts only what is not running. Every wait is bounded
# (QLORA_DB_TIMEOUT seconds, default 60); on failure it exits non-zero with the relevant log tail.
# Ports: QLORA_DB_PG_PORT, QLORA_DB_MYSQL_PORT. scripts/db/down.sh stops both.
# Test settings, not a production database's: fsync and synchronous commits are off.
set -Eeuo pipefail

DIR="${QLORA_DB_DIR:-/tmp/qlora-db}"
TIMEOUT="${QLORA_DB_TIMEOUT:-60}"
PG_PORT="${QLORA_DB_PG_PORT:-5433}"
MY_PORT="${QLORA_DB_MYSQL_PORT:-3308}"
ROLE=qlora DB=qlora
LOG="$DIR/log"
PG_DATA="$DIR/pg/data"; PG_SOCK="$DIR/pg/run"; PG_LOG="$DIR/pg/postgresql.log"
MY_DIR="$DIR/mariadb"; MY_DATA="$MY_DIR/data"; MY_SOCK="$MY_DIR/mysqld.sock"; MY_PID="$MY_DIR/mariadbd.pid"
URLS="$DIR/urls.env"

TAG=db-up
DOWN_HINT="logs under $LOG, $PG_LOG; scripts/db/down.sh stops what was started"
# shellcheck source=../lib/services.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/services.sh"
trap 'rc=$?; echo "[db-up] ERROR: command failed (rc=$rc) at line $LINENO: $BASH_COMMAND" >&2; exit $rc' ERR

pg_bin() { local d; d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"; [[ -x "$d/initdb" ]] && echo "$d"; }
# PostgreSQL's programs run as the `postgres` user when this script runs as root (the server refuses root)
AS_PG=(); ((EUID == 0)) && AS_PG=(runuser -u postgres --)

# ---------------------------------------------------------------- the password and the URLs
mkdir -p "$DIR" "$LOG"; chmod 755 "$DIR"
# URL-safe but for one character: the '@' is percent-encoded in the URLs (%40), as a real password's would be
[[ -s "$DIR/password" ]] || (umask 077; printf 'Sw33p@%s' "$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 12)" >"$DIR/password")
chmod 600 "$DIR/password"
PASS="$(cat "$DIR/password")"
PASS_URL="${PASS//@/%40}"
PG_URL="postgresql+psycopg://$ROLE:$PASS_URL@127.0.0.1:$PG_PORT/$DB"
MY_URL="mysql+pymysql://$ROLE:$PASS_URL@127.0.0.1:$MY_PORT/$DB"

pg_ok() {
  local bin; bin="$(pg_bin)" || return 1
  [[ "$(PGPASSWORD="$PASS" PGCONNECT_TIMEOUT=5 timeout 10 "$bin/psql" -X -w -h 127.0.0.1 -p "$PG_PORT" -U "$ROLE" -d "$DB" -Atc 'select 1' 2>/dev/null)" == 1 ]]
}
my_ok() {
  command -v mariadb >/dev/null 2>&1 || return 1
  [[ "$(MYSQL_PWD="$PASS" timeout 10 mariadb --no-defaults --connect-timeout=5 -h 127.0.0.1 -P "$MY_PORT" -u "$ROLE" -D "$DB" -N -e 'select 1' 2>/dev/null)" == 1 ]]
}
write_urls() {
  local tmp; tmp="$(mktemp "$URLS.XXXXXX")"
  printf '# written by scripts/db/up.sh: loopback test databases (password in %s)\nQLORA_EXP_TEST_POSTGRES_URL=%s\nQLORA_EXP_TEST_MYSQL_URL=%s\n' \
    "$DIR/password" "$PG_URL" "$MY_URL" >"$tmp"
  chmod 600 "$tmp"; mv -f "$tmp" "$URLS"
}

if pg_ok && my_ok; then
  write_urls
  say "PostgreSQL on 127.0.0.1:$PG_PORT and MariaDB on 127.0.0.1:$MY_PORT already up; URLs in $URLS; nothing to do"
  exit 0
fi

# ---------------------------------------------------------------- packages
missing=()
pg_bin >/dev/null || missing+=(postgresql)
command -v mariadbd >/dev/null 2>&1 && command -v mariadb-install-db >/dev/null 2>&1 || missing+=(mariadb-server)
if ((${#missing[@]})); then
  ((EUID == 0)) || die "missing ${missing[*]}, and installing Debian packages needs root"
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # SLURM's up.sh may run apt at the same time (CI starts both): wait for its lock, bounded
  ok=0
  for i in 1 2 3 4 5 6; do
    timeout 300 apt-get -o DPkg::Lock::Timeout=120 update -q >>"$LOG/apt.log" 2>&1 && { ok=1; break; }
    sleep $((i * 5))
  done
  ((ok)) || die "apt-get update failed" "$LOG/apt.log"
  # The packages' own scripts may not start services here (policy-rc.d): ours are started below, on our ports.
  timeout 900 apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}" >>"$LOG/apt.log" 2>&1 \
    || die "apt-get install ${missing[*]} failed" "$LOG/apt.log"
  say "packages installed"
fi
PG_BIN="$(pg_bin)" || die "no PostgreSQL binaries under /usr/lib/postgresql/*/bin"
if ((EUID == 0)) && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi
PG_OWNER="$( ((EUID == 0)) && echo postgres || id -un)"

# ---------------------------------------------------------------- PostgreSQL (loopback, $PG_PORT)
start_pg() {
  mkdir -p "$DIR/pg" "$PG_SOCK"
  chown "$PG_OWNER" "$DIR/pg" "$PG_SOCK"; chmod 700 "$DIR/pg"; chmod 755 "$PG_SOCK"
  if [[ ! -s "$PG_DATA/PG_VERSION" ]]; then
    rm -rf "$PG_DATA"
    (umask 077; printf '%s' "$PASS" >"$DIR/pg/pwfile"); chown "$PG_OWNER" "$DIR/pg/pwfile"
    # the superuser: trust on the socket only (this script's set-up); TCP needs the password
    timeout 120 "${AS_PG[@]}" "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C \
      --auth-local=trust --auth-host=scram-sha-256 --pwfile="$DIR/pg/pwfile" >"$LOG/pg-initdb.log" 2>&1 \
      || die "initdb failed" "$LOG/pg-initdb.log"
    rm -f "$DIR/pg/pwfile"
  fi
  local conf; conf="$(mktemp)"
  cat >"$conf" <<EOF
# written by scripts/db/up.sh (test settings: nothing here is durable)
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCK'
max_connections = 200
shared_buffers = 64MB
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
EOF
  install -m 600 -o "$PG_OWNER" "$conf" "$PG_DATA/qlora.conf"; rm -f "$conf"
  grep -q "^include_if_exists 'qlora.conf'" "$PG_DATA/postgresql.conf" \
    || echo "include_if_exists 'qlora.conf'" >>"$PG_DATA/postgresql.conf"
  touch "$PG_LOG"; chown "$PG_OWNER" "$PG_LOG"
  local running=0
  if timeout 10 "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    if timeout 10 "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
      running=1
      say "postgresql: running but $ROLE cannot log in on 127.0.0.1:$PG_PORT: setting the role up again"
    else  # ours, but not on this port (or hung): restart it
      say "postgresql: running but not answering on 127.0.0.1:$PG_PORT: restarting it"
      timeout 60 "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >>"$LOG/pg-ctl.log" 2>&1 || true
    fi
  fi
  if ((!running)); then
    timeout $((TIMEOUT + 10)) "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$TIMEOUT" start \
      </dev/null >>"$LOG/pg-ctl.log" 2>&1 || die "PostgreSQL did not start" "$LOG/pg-ctl.log" "$PG_LOG"
  fi
  # role and database, as the superuser over the socket
  timeout 30 "${AS_PG[@]}" "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres \
    >"$LOG/pg-setup.log" 2>&1 <<EOF || die "could not create the PostgreSQL role $ROLE" "$LOG/pg-setup.log" "$PG_LOG"
SELECT 'CREATE ROLE $ROLE' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ROLE') \gexec
ALTER ROLE $ROLE WITH LOGIN CREATEDB PASSWORD '$PASS';
SELECT 'CREATE DATABASE $DB OWNER $ROLE' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB') \gexec
EOF
  wait_for "$TIMEOUT" "PostgreSQL login as $ROLE on 127.0.0.1:$PG_PORT" pg_ok \
    || die "PostgreSQL runs but $ROLE cannot log in" "$PG_LOG" "$LOG/pg-setup.log"
  say "postgresql: up on 127.0.0.1:$PG_PORT (pid $(head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null || echo '?'))"
}

# ---------------------------------------------------------------- MariaDB (loopback, $MY_PORT)
my_root() { timeout 30 mariadb --no-defaults --socket="$MY_SOCK" -u root "$@"; }
start_my() {
  mkdir -p "$MY_DIR"
  local user=(); ((EUID == 0)) && user=(--user=root)
  if pid_alive "$MY_PID" mariadbd; then
    say "mariadb: running but $ROLE cannot log in on 127.0.0.1:$MY_PORT: setting the user up again"
  else
    if [[ ! -d "$MY_DATA/mysql" ]]; then
      rm -rf "$MY_DATA"
      timeout 120 mariadb-install-db --no-defaults "${user[@]}" --datadir="$MY_DATA" \
        --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed" "$LOG/mariadb-install.log"
    fi
    rm -f "$MY_PID"
    setsid -f mariadbd --no-defaults "${user[@]}" --datadir="$MY_DATA" --socket="$MY_SOCK" \
      --pid-file="$MY_PID" --bind-address=127.0.0.1 --port="$MY_PORT" \
      --log-error="$LOG/mariadb.log" --skip-name-resolve --skip-log-bin --max-connections=300 \
      --innodb-buffer-pool-size=64M --innodb-log-file-size=32M --innodb-flush-log-at-trx-commit=0 \
      --innodb-doublewrite=0 --innodb-use-native-aio=0 --performance-schema=0 </dev/null >>"$LOG/mariadb.out" 2>&1
    wait_for "$TIMEOUT" "mariadb ping on $MY_SOCK" timeout 10 mariadb-admin --no-defaults --socket="$MY_SOCK" -u root ping \
      || die "MariaDB did not come up" "$LOG/mariadb.out" "$LOG/mariadb.log"
    wait_for 10 "mariadbd pid file" pid_alive "$MY_PID" mariadbd || die "MariaDB wrote no pid file" "$LOG/mariadb.log"
  fi
  # with skip-name-resolve a TCP login from 127.0.0.1 is '$ROLE'@'127.0.0.1'; qlora% covers a test's fresh database
  my_root >"$LOG/mariadb-setup.log" 2>&1 <<EOF || die "could not create the MariaDB user $ROLE" "$LOG/mariadb-setup.log" "$LOG/mariadb.log"
CREATE DATABASE IF NOT EXISTS \`$DB\` CHARACTER SET utf8mb4;
CREATE USER IF NOT EXISTS '$ROLE'@'127.0.0.1' IDENTIFIED BY '$PASS';
CREATE USER IF NOT EXISTS '$ROLE'@'localhost' IDENTIFIED BY '$PASS';
ALTER USER '$ROLE'@'127.0.0.1' IDENTIFIED BY '$PASS';
ALTER USER '$ROLE'@'localhost' IDENTIFIED BY '$PASS';
GRANT ALL PRIVILEGES ON \`$DB%\`.* TO '$ROLE'@'127.0.0.1';
GRANT ALL PRIVILEGES ON \`$DB%\`.* TO '$ROLE'@'localhost';
FLUSH PRIVILEGES;
EOF
  wait_for "$TIMEOUT" "MariaDB login as $ROLE on 127.0.0.1:$MY_PORT" my_ok \
    || die "MariaDB runs but $ROLE cannot log in" "$LOG/mariadb.log" "$LOG/mariadb-setup.log"
  say "mariadb: up on 127.0.0.1:$MY_PORT (pid $(cat "$MY_PID"))"
}

# the two start side by side (initdb and mariadb-install-db take a few seconds each); each dies on its own
pg_ok && say "postgresql: already up on 127.0.0.1:$PG_PORT" || { start_pg > "$LOG/pg-up.out" 2>&1 & pg_job=$!; }
my_ok && say "mariadb: already up on 127.0.0.1:$MY_PORT" || { start_my > "$LOG/my-up.out" 2>&1 & my_job=$!; }
failed=0
for job in pg my; do
  var="${job}_job"
  [[ -n "${!var:-}" ]] || continue
  if wait "${!var}"; then cat "$LOG/$job-up.out"; else cat "$LOG/$job-up.out" >&2; failed=1; fi
done
((failed)) && { echo "[db-up] bring-up FAILED after $(elapsed)s" >&2; exit 1; }

write_urls
say "databases up: PostgreSQL 127.0.0.1:$PG_PORT, MariaDB 127.0.0.1:$MY_PORT; URLs in $URLS"
say "bring-up took $(elapsed)s"
