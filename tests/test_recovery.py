"""A driver that stops (kill -9 alone, a pause past stale_after_s, several drivers resuming at once), a killed trial
controller, and parallel drivers of one search: no finished or still-running training is run again, no point is lost,
no driver exits 0 while a trial of its study is unaccounted for, and parallel drivers explore different points.

On the toy app (tests/toy_app): each trial appends a line to `runs_log` when it starts, so a point trained twice
shows twice.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.conftest import PROCESSES, SWEEP_MODE, wait_for
from tests.test_sweep_semantics import own_lines, study, toy_args, toy_env

pytestmark = pytest.mark.slow


def start_toy(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(toy_args(tmp_path, f"runs_log={tmp_path}/runs.jsonl", *args), cwd=tmp_path,
                            env=toy_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"driver did not end in {timeout} s:\n{err[-3000:]}") from None


def runs(tmp_path: Path) -> list[dict]:
    path = tmp_path / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def states(tmp_path: Path) -> list[TrialState]:
    try:
        return [t.state for t in study(tmp_path).trials]
    except KeyError:  # no study yet
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def holds_a_lock_on(pid: int, path: Path) -> bool:
    """Whether process `pid` holds a POSIX lock on `path` (SQLite's locks on its database file, /proc/locks)."""
    inode = f":{os.stat(path).st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] != "->" and fields[4] == str(pid) and fields[5].endswith(inode):
            return True
    return False


def pause_outside_sqlite_lock(pid: int, db: Path) -> None:
    """SIGSTOP `pid` at a moment it holds no lock on the SQLite file `db`. A driver paused inside a write (a few ms of
    every heartbeat) blocks every other driver of that database until it resumes: SQLite's own property, which a
    database server shares for the rows it locks (docs/reliability.md). That is not what the test is about."""
    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        if not holds_a_lock_on(pid, db):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"process {pid} held a lock on {db} at every one of 200 tries")


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text[-3000:]


def test_a_driver_killed_alone_leaves_its_trials_training_and_the_rerun_watches_them_to_their_end(tmp_path):
    """kill -9 of the driver only: its two trials go on training (their processes are in sessions of their own).
    The rerun, at once (well inside stale_after_s: the dead driver ran on this host), takes both over from their
    running jobs: each point is trained once, both COMPLETE, nothing FAIL, nothing queued again. With workers (two
    worker processes, each a driver of the study with a heartbeat of its own) they too outlive the driver and the
    rerun waits for their trials."""
    grid = ("x=0,1", "sleep_s=6", "hydra.sweeper.n_jobs=2")
    first = start_toy(tmp_path, *grid)
    try:
        wait_for(lambda: len(runs(tmp_path)) == 2, timeout=60, what="both trials training")
    finally:
        os.kill(first.pid, signal.SIGKILL)  # the driver alone: not its process group
        first.communicate()
    assert states(tmp_path) == [TrialState.RUNNING] * 2
    proc = start_toy(tmp_path, *grid)
    out, err = finish(proc)
    assert proc.returncode == 0, err[-3000:]
    no_traceback(out, err)
    # a rerun's workers may start after one of the two trials ended (a loaded machine): they wait for what is left
    said = r"watched here to its end, not run again" if SWEEP_MODE == "processes" else r"waiting for trial\(s\) (0, 1|0|1) of another"
    assert re.search(said, out), out[-3000:]
    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert sorted(t.params["x"] for t in trials) == [0, 1]
    assert sorted(r["x"] for r in runs(tmp_path)) == [0, 1]  # trained once each


@pytest.mark.pins_mode
def test_a_paused_driver_and_a_second_driver_train_each_point_once(tmp_path):
    """SIGSTOP of a driver past stale_after_s while a second driver of the same command starts: the second takes
    the paused driver's trial over from its running job (it is not run again); on SIGCONT the first driver finds
    the trial taken over and ends without a traceback. The grid is trained point by point once. Processes only: a
    paused worker pauses the trial it runs, which the second driver then retries (docs/reliability.md)."""
    grid = ("x=0,1", "sleep_s=5", "hydra.sweeper.heartbeat_s=0.5", "hydra.sweeper.stale_after_s=2", PROCESSES)
    first = start_toy(tmp_path, *grid)
    second = None
    try:
        wait_for(lambda: len(runs(tmp_path)) == 1, timeout=60, what="the first trial training")
        pause_outside_sqlite_lock(first.pid, tmp_path / "study.db")
        time.sleep(3)  # past stale_after_s: the first driver's heartbeat is old
        second = start_toy(tmp_path, *grid)
        wait_for(lambda: len(runs(tmp_path)) == 2, timeout=60, what="the second point training")
        os.kill(first.pid, signal.SIGCONT)
        out2, err2 = finish(second)
        out1, err1 = finish(first)
    finally:
        os.kill(first.pid, signal.SIGCONT) if first.poll() is None else None
    assert first.returncode == 0 and second.returncode == 0, err1[-2000:] + err2[-2000:]
    no_traceback(out1, err1, out2, err2)
    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, [(t.number, t.state, t.user_attrs) for t in trials]
    assert sorted(r["x"] for r in runs(tmp_path)) == [0, 1]


# the toy app, with its first trial taken over and ended by "another driver" between two of the records its launch
# writes (what a pause at that moment, SIGSTOP or a swapped-out machine, lets a second driver do)
TAKEN_BETWEEN_RECORDS = """
import runpy, sys
from optuna.trial import Trial, TrialState
record, done = Trial.set_user_attr, []
def set_user_attr(self, key, value):
    if key == "folder" and not done:
        done.append(self.number)
        self.storage.set_trial_state_values(self._trial_id, TrialState.COMPLETE, [0.0])
    return record(self, key, value)
Trial.set_user_attr = set_user_attr
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_trial_taken_over_between_its_launch_records_is_left_and_the_next_point_runs(tmp_path):
    """CI saw this as a traceback (UpdateFinishedTrialError from `trial.set_user_attr`): a driver paused after its
    trial's first record, the job id, and a second driver took the trial over and ended it before the rest was
    written. Now the trial is left to the driver that ended it, its job is cancelled, and this driver goes on with
    the next point in the same slot, exit 0."""
    proc = subprocess.run([sys.executable, "-c", TAKEN_BETWEEN_RECORDS, *toy_args(tmp_path, "x=0,1",
                          f"runs_log={tmp_path}/runs.jsonl")[1:]], cwd=tmp_path, env=toy_env(tmp_path),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_traceback(proc.stdout, proc.stderr)
    out = proc.stdout + proc.stderr
    assert "trial 0 was taken over by another driver while this one was paused: its job is cancelled" in out, out
    trials = study(tmp_path).trials
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    assert trials[0].value == 0.0 and trials[1].params["x"] != trials[0].params["x"]
    assert [r["x"] for r in runs(tmp_path)] == [trials[1].params["x"]]  # the taken trial's job never trained here


def test_four_drivers_resuming_a_study_with_stale_trials_retry_each_once(tmp_path):
    """Two trials whose driver and processes were killed (nothing left to watch); four drivers of the same command
    start together: none crashes, each stale trial is FAIL once and retried once, the grid ends whole."""
    grid = ("x=0,1,2,3", "sleep_s=30", "hydra.sweeper.n_jobs=2", "hydra.sweeper.stale_after_s=2")
    first = start_toy(tmp_path, *grid)
    try:
        wait_for(lambda: len(runs(tmp_path)) == 2, timeout=60, what="two trials training")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver; its trials' controllers are in sessions of their own
        first.communicate()
    for t in study(tmp_path).trials:  # and they, with their trials (a worker's job id is "<host>-<pid>-<tag>:<trial>")
        job = t.user_attrs["job_id"]
        os.kill(int(job) if job.isdigit() else int(job.split(":")[0].rsplit("-", 2)[1]), signal.SIGKILL)
    (tmp_path / "runs.jsonl").unlink()
    time.sleep(2.5)
    fast = tuple(a if not a.startswith("sleep_s=") else "sleep_s=0.5" for a in grid)
    drivers = [start_toy(tmp_path, *fast) for _ in range(4)]
    outputs = [finish(d) for d in drivers]
    assert all(d.returncode == 0 for d in drivers), "\n".join(e[-2000:] for _, e in outputs)
    no_traceback(*(o + e for o, e in outputs))
    trials = study(tmp_path).trials
    # drivers asking at the same moment may be given one grid point twice (Optuna's GridSampler says so): the later
    # trial gives way, FAIL "duplicate", never run
    given_way = [t for t in trials if t.user_attrs.get("duplicate")]
    assert all(t.state == TrialState.FAIL and "not run" in t.user_attrs["fail_reason"] for t in given_way)
    failed = [t for t in trials if t.state == TrialState.FAIL and t not in given_way]
    assert len(failed) == 2 and all("no heartbeat" in t.user_attrs["fail_reason"] for t in failed)
    retries = [t for t in trials if t.system_attrs.get("retry_history") and t not in given_way]
    assert sorted(t.system_attrs["retry_history"][0] for t in retries) == sorted(t.number for t in failed)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["x"] for t in complete) == [0, 1, 2, 3]
    assert sorted(r["x"] for r in runs(tmp_path)) == [0, 1, 2, 3], describe(trials)  # after the kill: once each


def describe(trials) -> list:
    return [(t.number, t.state.name, t.params, t.system_attrs.get("grid_id"), t.system_attrs.get("retry_history"),
             t.user_attrs.get("fail_reason", "")[:50], t.user_attrs.get("job_id")) for t in trials]


def test_a_rerun_waits_for_trials_another_live_driver_runs(tmp_path):
    """A second driver started while the first still runs the last trial of the study does not exit 0 saying the
    sweep is done with a trial RUNNING: it waits for that trial, and both end with the grid COMPLETE."""
    grid = ("x=0", "sleep_s=4")
    first = start_toy(tmp_path, *grid)
    wait_for(lambda: len(runs(tmp_path)) == 1, timeout=60, what="the trial training")
    second = start_toy(tmp_path, *grid)
    out2, err2 = finish(second)
    assert second.returncode == 0, err2[-2000:]
    assert "waiting for trial(s) 0 of another" in out2, out2[-2000:]
    assert states(tmp_path) == [TrialState.COMPLETE]  # when the second driver exited, the trial had ended
    finish(first)
    assert first.returncode == 0 and len(runs(tmp_path)) == 1


@pytest.mark.pins_mode
def test_killing_a_trial_controller_kills_its_training(tmp_path):
    """kill -9 of a local trial's submitit controller: its training process ends with it (not minutes later beside
    the next trial), the trial is FAIL with its reason, and the sweep goes on to the next point."""
    proc = start_toy(tmp_path, "x=0,1", "sleep_s=3", "sleep_per_x=0", "hydra.sweeper.max_failure_rate=1.0", PROCESSES)
    try:
        wait_for(lambda: len(runs(tmp_path)) == 1, timeout=60, what="the first trial training")
        trial = study(tmp_path).trials[0]
        controller = int(trial.user_attrs["job_id"])
        training = children(controller)
        assert training and all(alive(p) for p in training)
        os.kill(controller, signal.SIGKILL)
        wait_for(lambda: not any(alive(p) for p in training), timeout=5, what="the training process to end")
        out, err = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    trials = study(tmp_path).trials
    assert trials[0].state == TrialState.FAIL and "ended without a result" in trials[0].user_attrs["fail_reason"]
    assert TrialState.COMPLETE in [t.state for t in trials]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_parallel_drivers_of_one_search_explore_different_points(tmp_path, sampler):
    """Four drivers of one random or TPE search (one seed in the config): each driver's sampler has a seed of its
    own (derived from the study and the driver), so the study's trials are distinct points, not four copies."""
    args = ("x=interval(0,10)", "y=interval(0,5)", f"hydra.sweeper.sampler.name={sampler}",
            "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=12")
    drivers = [start_toy(tmp_path, *args) for _ in range(4)]
    outputs = [finish(d) for d in drivers]
    assert all(d.returncode == 0 for d in drivers), "\n".join(e[-2000:] for _, e in outputs)
    trials = study(tmp_path).trials
    points = {(t.params["x"], t.params["y"]) for t in trials}
    assert len(trials) >= 12 and len(points) == len(trials), sorted(points)


def test_a_resumed_random_search_suggests_new_points(tmp_path):
    """The same command with a larger n_trials: the resumed driver's sampler does not replay the first driver's
    seed, so no point of the first run is suggested again; the first run itself is reproducible."""
    args = ("x=interval(0,10)", "hydra.sweeper.sampler.name=random", "hydra.sweeper.sampler.seed=7")
    for n in (3, 6):
        proc = subprocess.run(toy_args(tmp_path, *args, f"hydra.sweeper.n_trials={n}"), cwd=tmp_path,
                              env=toy_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not [line for line in own_lines(proc.stderr) if "Traceback" in line]
    xs = [t.params["x"] for t in study(tmp_path).trials]
    assert len(xs) == 6 and len(set(xs)) == 6
    again = tmp_path / "again"
    again.mkdir()
    proc = subprocess.run(toy_args(again, *args, "hydra.sweeper.n_trials=3"), cwd=again, env=toy_env(again),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and [t.params["x"] for t in study(again).trials] == xs[:3]


@pytest.mark.pins_mode
def test_stale_trial_whose_job_finished_is_completed_from_its_result(tmp_path):
    """A driver killed after its trial's process wrote its result but before the driver collected it: the rerun
    completes the trial from that result, with its value, and trains nothing."""
    # (processes: a worker runs its trial in its own process and tells the result at once)
    first = start_toy(tmp_path, "x=2", "sleep_s=0.5", "hydra.sweeper.poll_s=30", PROCESSES)  # the driver looks late
    try:
        def result_written():
            ts = study(tmp_path).trials if states(tmp_path) else []
            return ts and Path(ts[0].user_attrs.get("result_path", "/nonexistent")).exists()
        wait_for(result_written, timeout=60, what="the trial's result file")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    assert states(tmp_path) == [TrialState.RUNNING]
    proc = start_toy(tmp_path, "x=2", "sleep_s=0.5", PROCESSES)
    out, err = finish(proc)
    assert proc.returncode == 0, err[-2000:]
    assert "completed from its result" in out, out[-2000:]
    (trial,) = study(tmp_path).trials
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx((2 - 3.3) ** 2)
    assert len(runs(tmp_path)) == 1

