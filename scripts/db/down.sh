#!/usr/bin/env bash
# Stop the test databases started by scripts/db/up.sh (PostgreSQL and MariaDB under $QLORA_DB_DIR, default
# /tmp/qlora-db): PostgreSQL through pg_ctl (fast shutdown), MariaDB through its pid file; SIGTERM, a bounded
# wait, SIGKILL if needed. Idempotent: with nothing running it says so and exits 0. Data are kept (the next up.sh
# starts in a second or two) unless:
#   --purge   also delete $QLORA_DB_DIR (data, password, URLs, logs)
set -uo pipefail

DIR="${QLORA_DB_DIR:-/tmp/qlora-db}"
LOG="$DIR/log"; PG_DATA="$DIR/pg/data"; MY_PID="$DIR/mariadb/mariadbd.pid"
PURGE=0
for a in "$@"; do
  case "$a" in
    --purge) PURGE=1 ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
  esac
done

TAG=db-down
DOWN_HINT=""
# shellcheck source=../lib/services.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/services.sh"

if [[ ! -d "$DIR" ]]; then
  say "nothing to do: $DIR does not exist"
  exit 0
fi

# PostgreSQL: pg_ctl stop -m fast (as the data dir's owner), else SIGTERM/SIGKILL of the postmaster
if pid="$(read_pid "$PG_DATA/postmaster.pid" postgres)"; then
  pg_ctl_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)/pg_ctl"
  owner="$(stat -c %U "$PG_DATA")"
  as=(); ((EUID == 0)) && [[ "$owner" != root ]] && as=(runuser -u "$owner" --)
  if [[ -x "$pg_ctl_bin" ]] && timeout 40 "${as[@]}" "$pg_ctl_bin" -D "$PG_DATA" -m fast -w -t 30 stop >>"$LOG/pg-ctl.log" 2>&1; then
    say "postgresql (pid $pid) stopped"
  else
    stop_pid postgresql "$pid" 15
  fi
else
  say "postgresql: not running"
fi

# MariaDB
if pid="$(read_pid "$MY_PID" mariadbd)"; then
  stop_pid mariadb "$pid" 30
else
  say "mariadb: not running"
fi
rm -f "$MY_PID"

if ((PURGE)); then
  rm -rf "$DIR"
  say "removed $DIR"
fi

if ((failed)); then
  say "FAILED: a database could not be stopped (logs under $LOG)"
  exit 1
fi
say "databases down"
