#!/usr/bin/env bash
# Smoke test of the cluster brought up by up.sh. Every wait is bounded; exits non-zero on any
# mismatch. Checks:
#   1. sbatch --gpus-per-node=1 job sees CUDA_VISIBLE_DEVICES 0 or 1, ends COMPLETED in sacct
#   2. a 2-GPU job sees CUDA_VISIBLE_DEVICES=0,1, ends COMPLETED in sacct
#   3. a 3-GPU job is refused at submission (the node has exactly gpu:2)
#   4. a running job that is scancel'ed shows CANCELLED in sacct, and the node is idle again
#   5. submitit (AutoExecutor, gpus_per_node=1): result() is "0" or "1"
#   6. submitit: a cancelled job's result() raises UncompletedJobError (needs slurmdbd)
set -uo pipefail

DIR="${QLORA_SLURM_DIR:-/tmp/qlora-slurm}"
PY="${PYTHON:-python}"
export SLURM_CONF="$DIR/etc/slurm.conf"
HOST="$(hostname -s)"
OUT="$DIR/check/$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$OUT"

t_start=$(date +%s%N)
elapsed() { awk -v a="$t_start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }
say() { echo "[slurm-check $(elapsed)s] $*"; }
passed=0; failed=0
ok() { passed=$((passed + 1)); say "PASS: $*"; }
bad() { failed=$((failed + 1)); say "FAIL: $*"; }

if ! timeout 10 sinfo -h -o %T >/dev/null 2>&1; then
  echo "[slurm-check] SLURM does not answer (SLURM_CONF=$SLURM_CONF): run scripts/slurm/up.sh first" >&2
  exit 2
fi

# job_state ID: the job's state in sacct (first word: "CANCELLED by 0" -> CANCELLED), or empty.
job_state() { timeout 10 sacct -n -X -P -j "$1" -o State 2>/dev/null | head -n 1 | awk '{print $1}'; }

# wait_done ID SECONDS: wait until sacct shows a final state; prints it (or TIMEOUT-WAITING).
wait_done() {
  local end=$(( $(date +%s) + $2 )) s
  while :; do
    s="$(job_state "$1")"
    case "$s" in
      ""|PENDING|RUNNING|REQUEUED|RESIZING|SUSPENDED|CONFIGURING|COMPLETING|REQUEUE_HOLD|REQUEUE_FED) ;;
      *) echo "$s"; return 0 ;;
    esac
    (( $(date +%s) >= end )) && { echo "TIMEOUT-WAITING(last:${s:-none})"; return 1; }
    sleep 0.25
  done
}

# wait_running ID SECONDS
wait_running() {
  local end=$(( $(date +%s) + $2 ))
  until [[ "$(timeout 5 squeue -h -j "$1" -o %T 2>/dev/null)" == RUNNING ]]; do
    (( $(date +%s) >= end )) && return 1
    sleep 0.25
  done
}

# wait_idle SECONDS
wait_idle() {
  local end=$(( $(date +%s) + $1 ))
  until [[ "$(timeout 5 sinfo -h -n "$HOST" -o %T 2>/dev/null)" == idle ]]; do
    (( $(date +%s) >= end )) && return 1
    sleep 0.25
  done
}

say "output under $OUT"

# ---------------------------------------------------------------- 1 + 2: GPU jobs via sbatch
j1="$(timeout 20 sbatch --parsable -p debug -t 2 --gpus-per-node=1 -o "$OUT/gpu1.out" \
      --wrap 'echo $CUDA_VISIBLE_DEVICES' 2>"$OUT/gpu1.sbatch.err")" || j1=""
j2="$(timeout 20 sbatch --parsable -p debug -t 2 --gpus-per-node=2 -o "$OUT/gpu2.out" \
      --wrap 'echo $CUDA_VISIBLE_DEVICES' 2>"$OUT/gpu2.sbatch.err")" || j2=""
say "submitted 1-GPU job ${j1:-<none>}, 2-GPU job ${j2:-<none>}"

for spec in "1:$j1:^[01]\$" "2:$j2:^0,1\$"; do
  n="${spec%%:*}"; rest="${spec#*:}"; id="${rest%%:*}"; want="${rest#*:}"
  if [[ -z "$id" ]]; then
    bad "$n-GPU job was not submitted: $(cat "$OUT/gpu$n.sbatch.err")"
    continue
  fi
  st="$(wait_done "$id" 60)"
  cvd="$(tr -d '[:space:]' <"$OUT/gpu$n.out" 2>/dev/null || true)"
  say "$n-GPU job $id: sacct state $st, CUDA_VISIBLE_DEVICES='$cvd'"
  if [[ "$st" == COMPLETED && "$cvd" =~ $want ]]; then
    ok "$n-GPU job $id COMPLETED with CUDA_VISIBLE_DEVICES=$cvd"
  else
    bad "$n-GPU job $id: state '$st', CUDA_VISIBLE_DEVICES='$cvd' (wanted COMPLETED and /$want/)"
  fi
done
[[ -n "$j1$j2" ]] && timeout 10 sacct -X -j "${j1:-0},${j2:-0}" -o JobID,JobName%12,State,ExitCode,AllocTRES%40

# ---------------------------------------------------------------- 3: more GPUs than the node has
if j3="$(timeout 20 sbatch --parsable -p debug -t 1 --gpus-per-node=3 -o /dev/null --wrap true 2>"$OUT/gpu3.sbatch.err")"; then
  bad "a 3-GPU job was accepted (job $j3): the node should have exactly 2 GPUs"
  timeout 10 scancel "$j3" || true
else
  ok "3-GPU job refused: $(tr '\n' ' ' <"$OUT/gpu3.sbatch.err")"
fi

# ---------------------------------------------------------------- 4: scancel -> CANCELLED
jc="$(timeout 20 sbatch --parsable -p debug -t 5 -o "$OUT/cancel.out" --wrap 'sleep 300' 2>"$OUT/cancel.sbatch.err")" || jc=""
if [[ -z "$jc" ]]; then
  bad "sleep job was not submitted: $(cat "$OUT/cancel.sbatch.err")"
else
  wait_running "$jc" 30 || say "note: job $jc not RUNNING after 30 s, cancelling anyway"
  timeout 10 scancel "$jc"
  st="$(wait_done "$jc" 30)"
  timeout 10 sacct -X -j "$jc" -o JobID,JobName%12,State,ExitCode
  if [[ "$st" == CANCELLED ]]; then ok "job $jc cancelled: sacct says CANCELLED"; else bad "job $jc after scancel: sacct state '$st'"; fi
  if wait_idle 30; then ok "node $HOST idle again after the cancel"; else bad "node $HOST not idle 30 s after the cancel: $(sinfo -h -n "$HOST" -o %T)"; fi
fi

# ---------------------------------------------------------------- 5 + 6: submitit
if ! timeout 60 "$PY" -c "import submitit" 2>"$OUT/submitit-import.err"; then
  bad "python cannot import submitit ($PY): $(tail -n 3 "$OUT/submitit-import.err")"
else
  timeout 240 "$PY" - "$OUT/submitit" <<'PYEOF'
import os
import sys
import time

import submitit

folder = sys.argv[1]
failed = 0


def say(msg):
    print(f"[slurm-check submitit] {msg}", flush=True)


def cuda_visible_devices():
    return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")


def sleeper():
    time.sleep(300)
    return "not cancelled"


def wait_done(job, secs):
    """job.done() polled with a deadline (job.result() alone waits forever)."""
    end = time.time() + secs
    while not job.done():
        if time.time() > end:
            return False
        time.sleep(0.5)
    return True


ex = submitit.AutoExecutor(folder=folder)
say(f"submitit {submitit.__version__}, executor cluster: {ex.cluster}")
if ex.cluster != "slurm":
    say("FAIL: AutoExecutor did not pick slurm")
    sys.exit(1)
ex.update_parameters(slurm_partition="debug", timeout_min=5, cpus_per_task=1, mem_gb=1, gpus_per_node=1)

# 5. result of a 1-GPU job
t0 = time.time()
job = ex.submit(cuda_visible_devices)
if not wait_done(job, 90):
    say(f"FAIL: job {job.job_id} not done after 90 s (state {job.state}); cancelling")
    job.cancel(check=False)
    failed += 1
else:
    try:
        res = job.result()
    except Exception as e:  # noqa: BLE001
        res = f"<raised {type(e).__name__}: {e}>"
    dt = time.time() - t0
    if res in ("0", "1"):
        say(f"PASS: job {job.job_id} result CUDA_VISIBLE_DEVICES={res!r} in {dt:.1f}s (state {job.state})")
    else:
        say(f"FAIL: job {job.job_id} result {res!r} (state {job.state})")
        failed += 1

# 6. a cancelled job: result() must raise UncompletedJobError, not hang
job = ex.submit(sleeper)
end = time.time() + 30
while job.state not in ("RUNNING",) and time.time() < end:
    time.sleep(0.5)
job.cancel(check=False)
t0 = time.time()
if not wait_done(job, 60):
    say(f"FAIL: cancelled job {job.job_id} not done after 60 s (state {job.state})")
    failed += 1
else:
    t_done = time.time() - t0
    try:
        # result() first waits up to Job._results_timeout_s (15 s) for a result file that a
        # cancelled job never writes: most of this check's time.
        res = job.result()
        say(f"FAIL: cancelled job {job.job_id} returned {res!r}")
        failed += 1
    except submitit.core.utils.UncompletedJobError as e:
        msg = " ".join(str(e).splitlines()[:2])
        say(
            f"PASS: cancelled job {job.job_id}: done() after {t_done:.1f}s, result() raised "
            f"UncompletedJobError after {time.time() - t0:.1f}s: {msg}"
        )
    except Exception as e:  # noqa: BLE001
        say(f"FAIL: cancelled job {job.job_id} raised {type(e).__name__}: {e}")
        failed += 1
sys.exit(1 if failed else 0)
PYEOF
  rc=$?
  if ((rc == 0)); then
    ok "submitit checks"
  else
    bad "submitit checks (rc=$rc$( ((rc == 124)) && echo ', timed out'))"
  fi
fi

say "done in $(elapsed)s"
echo "slurm-check: $passed passed, $failed failed"
((failed == 0))
