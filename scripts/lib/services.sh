# Shell helpers shared by the scripts that start and stop the test services (scripts/slurm, scripts/db).
# Source it after setting TAG (the log prefix, e.g. slurm-up) and, for `die`, DOWN_HINT (where the logs are and
# what stops what was started).

t_start=$(date +%s%N)
elapsed() { awk -v a="$t_start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }
say() { echo "[$TAG $(elapsed)s] $*"; }
failed=0

# die MESSAGE [LOGFILE...]: print the message, the tail of each log given, and exit 1.
die() {
  local msg="$1"; shift
  echo "[$TAG] ERROR: $msg" >&2
  local f
  for f in "$@"; do
    if [[ -s "$f" ]]; then
      echo "----- last 30 lines of $f -----" >&2
      tail -n 30 "$f" >&2
    fi
  done
  echo "[$TAG] bring-up FAILED after $(elapsed)s (${DOWN_HINT:-})" >&2
  exit 1
}

# wait_for SECONDS DESCRIPTION CMD...: poll CMD (every 0.25 s) until it succeeds; 1 on timeout.
wait_for() {
  local secs="$1" desc="$2"; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) >= end )); then
      echo "[$TAG] timed out after ${secs}s waiting for: $desc" >&2
      return 1
    fi
    sleep 0.25
  done
}

# alive PID: the process exists and is not a zombie (a killed daemon waits to be reaped by init).
alive() { kill -0 "$1" 2>/dev/null && [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]; }

# read_pid PIDFILE COMM: print the pid on the file's first line if it is alive and its command name is COMM.
read_pid() {
  local pid
  [[ -s "$1" ]] || return 1
  pid="$(head -n 1 "$1" | tr -dc '0-9')"
  [[ -n "$pid" ]] && alive "$pid" && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]] && echo "$pid"
}

# pid_alive PIDFILE COMM: read_pid, as a test.
pid_alive() { read_pid "$@" >/dev/null; }

# stop_pid NAME PID SECONDS: SIGTERM, wait up to SECONDS, then SIGKILL (and wait up to 5 s more).
stop_pid() {
  local name="$1" pid="$2" secs="$3" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < secs * 4; i++)); do
    alive "$pid" || { say "$name (pid $pid) stopped"; return 0; }
    sleep 0.25
  done
  say "$name (pid $pid) did not stop in ${secs}s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null
  for ((i = 0; i < 20; i++)); do
    alive "$pid" || return 0
    sleep 0.25
  done
  say "ERROR: $name (pid $pid) is still running"
  failed=1
}
