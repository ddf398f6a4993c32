"""What a user of hydra-optuna-sweeper expects of a sweep, end to end on the instant toy app (tests/toy_app):
grids run whole, n_trials capped at the grid, fixed values leave the search, every kind of return value, and
Ctrl-C that keeps finished work and never uses up n_trials. The app has none of qlora_exp's settings."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from omegaconf import OmegaConf
from optuna.trial import TrialState

from tests.conftest import REPO, wait_for

TOY = REPO / "tests" / "toy_app" / "app.py"
pytestmark = pytest.mark.slow


def toy_args(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, str(TOY), "-m", f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db",
            f"hydra.sweeper.study_dir={tmp_path}/runs", "hydra.sweeper.study_name=toy", *args]


def toy_env(tmp_path: Path) -> dict:
    return {**os.environ, "TOY_OUTPUT_ROOT": str(tmp_path / "out"), "PYTHONPATH": str(REPO)}


def run_toy(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(toy_args(tmp_path, *args), cwd=tmp_path, env=toy_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


def study(tmp_path: Path) -> optuna.Study:
    """The toy sweep's study, read as the sweeper reads it: through build_storage, which retries the race of two
    processes creating a new database's tables (a test polling a driver that is just starting is the second)."""
    from sweeper.storage import build_storage

    return optuna.load_study(study_name="toy", storage=build_storage(f"sqlite:///{tmp_path}/study.db"))


def own_lines(stderr: str) -> list[str]:
    """stderr less Optuna's own `[I ...]` log lines."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[I ")]


def trial_overrides(tmp_path: Path, number: int) -> list[str]:
    return list(OmegaConf.load(tmp_path / "runs" / "toy" / str(number) / ".hydra" / "overrides.yaml"))


def test_a_grid_is_not_pruned_unless_a_pruner_is_asked_for(tmp_path):
    """The default pruner is `auto`: median for a search, none for a grid. A grid's trials get no pruning callback
    (so none can stop early); with hydra/sweeper/pruner=median they do."""
    proc = run_toy(tmp_path, "x=0,1,2,3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sampler grid, pruner none" in proc.stdout, proc.stdout[-2000:]
    assert [t.state for t in study(tmp_path).trials] == [TrialState.COMPLETE] * 4
    assert not any("optuna_pruning" in o for n in range(4) for o in trial_overrides(tmp_path, n))
    other = tmp_path / "asked"
    other.mkdir()
    proc = run_toy(other, "x=0,1", "hydra/sweeper/pruner=median")
    assert proc.returncode == 0 and "sampler grid, pruner median" in proc.stdout, proc.stdout[-2000:]
    assert any(o.startswith("+callbacks.optuna_pruning._target_=") for o in trial_overrides(other, 0))


def test_n_trials_above_the_grid_is_capped_with_a_note(tmp_path):
    proc = run_toy(tmp_path, "x=0,1,2", "hydra.sweeper.n_trials=20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "n_trials=20 is more than the grid's 3 point(s): capped at 3" in proc.stdout
    trials = study(tmp_path).trials
    assert len(trials) == 3 and sorted(t.params["x"] for t in trials) == [0, 1, 2]
    assert OmegaConf.load(tmp_path / "runs" / "toy" / "optimization_results.yaml").n_trials == 3


@pytest.mark.parametrize("sampler", ["random", "grid"])  # TPE: tests/peer/...::test_optuna_example[True]
def test_a_fixed_command_line_value_takes_its_key_out_of_the_search(tmp_path, sampler):
    """`y=0.5` on the command line beside a params block that searches y: y is fixed for every trial, for every
    sampler (hydra-optuna-sweeper's behaviour); before, the sampled value won."""
    space = "{x:'choice(0,1,2)',y:'choice(0.0,1.0,2.0)'}" if sampler == "grid" else "{x:'choice(0,1,2)',y:'interval(0,4)'}"
    proc = run_toy(tmp_path, f"hydra.sweeper.params={space}", "y=0.5", f"hydra/sweeper/sampler={sampler}",
                   "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = study(tmp_path).trials
    assert len(trials) == 3 and all(set(t.params) == {"x"} for t in trials)
    for t in trials:  # the trial ran with y=0.5: its value is (x - 3.3)^2 + 0.5
        assert t.value == pytest.approx((t.params["x"] - 3.3) ** 2 + 0.5)


@pytest.mark.parametrize("returns,extra,expected", [
    ("value", [], lambda x: [(x - 3.3) ** 2]),
    ("pair", ["hydra.sweeper.direction=[minimize,maximize]"], lambda x: [(x - 3.3) ** 2, -(x - 3.3) ** 2]),
    ("dict", ["hydra.sweeper.objectives=[other,value]", "hydra.sweeper.direction=[maximize,minimize]"],
     lambda x: [-(x - 3.3) ** 2, (x - 3.3) ** 2]),
    ("none", ["hydra.sweeper.objectives=[value,other]", "hydra.sweeper.direction=[minimize,minimize]"],
     lambda x: [(x - 3.3) ** 2, -(x - 3.3) ** 2]),  # read from metrics.json in the trial's folder
], ids=["float", "sequence", "dict", "metrics_file"])
def test_return_values(tmp_path, returns, extra, expected):
    proc = run_toy(tmp_path, "x=1,2", f"returns={returns}", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, [t.user_attrs for t in trials]
    for t in trials:
        assert t.values == pytest.approx(expected(t.params["x"]))
    results = OmegaConf.load(tmp_path / "runs" / "toy" / "optimization_results.yaml")
    assert ("solutions" in results) == (len(trials[0].values) > 1)
    if "solutions" in results:  # the Pareto front: the study's best trials, each with its folder and values
        assert {p.number for p in results.pareto_front} == {t.number for t in study(tmp_path).best_trials}
        for p in results.pareto_front:  # its values in the order named, and its folder the trial's own
            assert list(p["values"]) == pytest.approx(expected(p.params.x))
            assert json.loads((Path(p.folder) / "metrics.json").read_text())["value"] == pytest.approx((p.params.x - 3.3) ** 2)


@pytest.mark.parametrize("returns,extra,reason", [
    ("text", [], "the return value must be a number, got str 'not a number'"),
    ("pair", [], "the task returned 2 value(s) for 1 objective(s)"),
    ("dict", [], "the task returned a dict of 2 values ['other', 'value']; name the objective(s)"),
], ids=["text", "two_values_one_objective", "dict_without_objectives"])
def test_a_return_value_that_is_no_objective_fails_that_trial_in_one_line(tmp_path, returns, extra, reason):
    """Never a driver crash or a trial left RUNNING: each trial FAIL with the reason, the sweep stopped by
    max_failure_rate in one line (exit 1, no traceback)."""
    proc = run_toy(tmp_path, "x=1,2", f"returns={returns}", *extra)
    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert all(reason in t.user_attrs["fail_reason"] for t in trials), trials[0].user_attrs
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line.split(":")[0] for line in own_lines(proc.stderr)] == ["error"], proc.stderr[-2000:]
    assert "max_failure_rate" in proc.stderr


def start_toy(tmp_path: Path, *args: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(toy_args(tmp_path, *args), cwd=tmp_path, env=toy_env(tmp_path), stdout=subprocess.DEVNULL,
                                stderr=f, text=True, start_new_session=True)


def results_written(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "runs" / "toy").rglob("*_result.pkl"))  # submitit's (.submitit) or a worker's (.workers)


def test_ctrl_c_collects_a_finished_trial_and_queues_the_one_it_cut_short(tmp_path):
    """Two slots: x=0 ends at once, x=1 sleeps 60 s. The driver polls every 5 s, so the Ctrl-C lands after x=0's
    process has finished but before the driver has collected it (the case that used to store it FAIL and train it
    again). x=0 is COMPLETE; x=1 is FAIL 'interrupted' with a WAITING retry; one line on stderr, exit 130, nothing
    printed afterwards; n_trials is not used up: the rerun trains x=1 only and reports 2/2."""
    args = ["x=0,1", "sleep_per_x=60", "hydra.sweeper.n_jobs=2", "hydra.sweeper.poll_s=5"]
    log = tmp_path / "driver.err"
    driver = start_toy(tmp_path, *args, log=log)
    try:
        wait_for(lambda: len(results_written(tmp_path)) == 1, timeout=60, what="x=0's result")
        driver.send_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C (to the driver's process group)
        assert driver.wait(timeout=60) == 130
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    size = log.stat().st_size
    time.sleep(2)
    assert log.stat().st_size == size, "something printed after the driver exited"
    lines = own_lines(log.read_text())
    assert len(lines) == 1 and lines[0].startswith("Ctrl-C: stopping the sweep"), log.read_text()[-3000:]
    by_x = {}
    for t in study(tmp_path).trials:
        by_x.setdefault(t.params["x"], []).append(t)
    assert [t.state for t in by_x[0]] == [TrialState.COMPLETE]
    assert [t.state for t in by_x[1]] == [TrialState.FAIL, TrialState.WAITING]
    assert by_x[1][0].user_attrs["interrupted"] is True
    assert by_x[1][1].system_attrs["retry_history"] == [by_x[1][0].number]
    # the rerun: x=1 once more (its retry), quickly this time; x=0 is not trained again
    proc = run_toy(tmp_path, "x=0,1", "sleep_per_x=0", "hydra.sweeper.n_jobs=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    states = sorted((t.params["x"], t.state.name, t.number) for t in study(tmp_path).trials)
    assert [s[:2] for s in states] == [(0, "COMPLETE"), (1, "COMPLETE"), (1, "FAIL")], states
    assert "[toy] 2/2 finished: 2 complete" in proc.stdout and "trial 0 started" not in proc.stdout


@pytest.mark.pins_mode
@pytest.mark.parametrize("mode", ["workers", "processes"])
def test_timeout_starts_no_trial_after_it_and_lets_running_ones_finish(tmp_path, mode):
    """hydra.sweeper.timeout (Optuna's study.optimize(timeout=...)): once it has passed since the command started, no
    trial starts; those running finish and are COMPLETE; the sweep exits 0 and says so. A rerun of the same command
    resumes the study with a timeout of its own. 20 s: past the driver's start even on a loaded CI machine (at 6 s,
    under two xdist workers, the driver once started none), far short of the grid's 30 s of trials."""
    started, limit = time.time(), 20
    proc = run_toy(tmp_path, "x=range(0,40)", "sleep_s=1.5", "hydra.sweeper.n_jobs=2", f"hydra.sweeper.timeout={limit}",
                   f"hydra.sweeper.mode={mode}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"hydra.sweeper.timeout={limit}s has passed: no more trials start" in proc.stdout + proc.stderr, proc.stdout[-2000:]
    trials = study(tmp_path).trials
    assert 0 < len(trials) < 40 and {t.state for t in trials} == {TrialState.COMPLETE}, [t.state for t in trials]
    # none began after the timeout, counted from the command's start (its imports and checks included); a trial
    # that passed the check just before it is asked for a few ms later
    late = [(t.number, round(t.datetime_start.timestamp() - started, 2)) for t in trials
            if t.datetime_start.timestamp() > started + limit + 0.3]
    assert not late, late
    assert max(t.datetime_complete.timestamp() for t in trials) > started + limit - 1.5  # the last ones ran to their end
    first = len(trials)
    again = run_toy(tmp_path, "x=range(0,40)", "sleep_s=1.5", "hydra.sweeper.n_jobs=2", f"hydra.sweeper.timeout={limit}",
                    f"hydra.sweeper.mode={mode}")
    assert again.returncode == 0, again.stderr[-2000:]
    trials = study(tmp_path).trials
    assert len(trials) > first and {t.state for t in trials} == {TrialState.COMPLETE}
    assert len({t.params["x"] for t in trials}) == len(trials)  # the rerun took up the grid where it was left


def test_two_interrupts_in_a_row_lose_nothing_and_never_use_up_n_trials(tmp_path):
    """Two Ctrl-C's 20 ms apart, twice over: no trial left RUNNING, at most one line per Ctrl-C, no traceback; the
    interrupted trials never count, so the third run still trains the whole 3-point grid to 3/3."""
    for attempt in range(2):
        log = tmp_path / f"driver{attempt}.err"
        driver = start_toy(tmp_path, "x=0,1,2", "sleep_s=60", "hydra.sweeper.n_jobs=2", log=log)
        try:
            wait_for(lambda: len(study(tmp_path).get_trials(states=(TrialState.RUNNING,))) == 2 if (
                tmp_path / "study.db").exists() and optuna.get_all_study_names(f"sqlite:///{tmp_path}/study.db")
                else False, timeout=60, what="two trials running",
                errors=(FileNotFoundError, ValueError, KeyError, sqlalchemy.exc.SQLAlchemyError))  # tables being made
            time.sleep(1.5)  # their processes started
            driver.send_signal(signal.SIGINT)
            time.sleep(0.02)
            driver.send_signal(signal.SIGINT)
            assert driver.wait(timeout=60) == 130
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        text = log.read_text()
        lines = own_lines(text)
        assert 1 <= len(lines) <= 2 and all(line.startswith("Ctrl-C") for line in lines), text[-3000:]
        assert "Traceback" not in text
        trials = study(tmp_path).trials
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        assert all(t.user_attrs.get("interrupted") for t in trials if t.state == TrialState.FAIL)
    proc = run_toy(tmp_path, "x=0,1,2", "hydra.sweeper.n_jobs=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    complete = [t.params["x"] for t in study(tmp_path).trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == [0, 1, 2] and "[toy] 3/3 finished: 3 complete" in proc.stdout, proc.stdout[-2000:]


def test_the_same_study_in_another_sweep_folder_says_where_its_trials_are(tmp_path):
    first = run_toy(tmp_path, "x=0,1", f"hydra.sweep.dir={tmp_path}/first")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_toy(tmp_path, "x=0,1", f"hydra.sweep.dir={tmp_path}/second")
    assert again.returncode == 0 and not re.search(r"trial \d+ started \(", again.stdout), again.stdout[-2000:]
    assert f"study 'toy' was started in {tmp_path}/first: its earlier trials' folders are there" in again.stdout
    for t in study(tmp_path).trials:  # the trials' folders are in the first sweep folder, and none in the second
        value = json.loads((tmp_path / "first" / str(t.number) / "metrics.json").read_text())["value"]
        assert value == pytest.approx(t.value)
    assert not list((tmp_path / "second").glob("*/metrics.json"))


def test_a_sweep_dir_in_the_apps_own_config_is_the_sweep_folder(tmp_path):
    """`hydra.sweep.dir` written in the app's config (not on the command line) is used as the sweep folder, as
    hydra-optuna-sweeper users expect; one with `${now:...}` is not (a timestamp would split a resumed study)."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "own_dir.yaml").write_text("defaults:\n  - config\n  - _self_\nhydra:\n  sweep:\n"
                                       f"    dir: {tmp_path}/my_sweeps\n")
    (conf / "timestamped.yaml").write_text("defaults:\n  - config\n  - _self_\nhydra:\n  sweep:\n"
                                           f"    dir: {tmp_path}/stamped/${{now:%H-%M-%S}}\n")
    args = [a for a in toy_args(tmp_path, "x=0,1") if not a.startswith(("hydra.sweeper.study_dir=",
                                                                         "hydra.sweeper.study_name="))]
    for name in ("own_dir", "timestamped"):
        proc = subprocess.run([*args[:2], f"--config-dir={conf}", f"--config-name={name}", *args[2:],
                               f"hydra.sweeper.study_name={name}", f"hydra.sweeper.study_dir={tmp_path}/studies"],
                              cwd=tmp_path, env=toy_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.parent.name for p in (tmp_path / "my_sweeps").glob("*/metrics.json")) == ["0", "1"]
    assert sorted(p.parent.name for p in (tmp_path / "studies" / "timestamped").glob("*/metrics.json")) == ["0", "1"]
    assert not (tmp_path / "stamped").exists()


def broken_search_space(cfg, trial):
    """A custom_search_space function with a bug (test_a_custom_search_space_that_raises_...)."""
    trial.suggest_float("z", 0, 1)
    raise KeyError("max_z_difference_from_x")


def test_a_custom_search_space_that_raises_stops_the_sweep_in_one_line(tmp_path):
    """The user's custom_search_space function raising: that trial FAIL with the error, the sweep stopped in one
    line (exit 1), no traceback, no trial left RUNNING."""
    proc = run_toy(tmp_path, "x=0,1", "hydra.sweeper.custom_search_space=tests.test_sweep_semantics.broken_search_space")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = own_lines(proc.stderr)
    assert len(lines) == 1 and "custom_search_space=tests.test_sweep_semantics.broken_search_space raised KeyError" \
        in lines[0], proc.stderr[-2000:]
    (trial,) = study(tmp_path).trials
    assert trial.state == TrialState.FAIL and "max_z_difference_from_x" in trial.user_attrs["fail_reason"]


@pytest.mark.pins_mode
def test_sweep_status_of_a_local_sweep_asks_slurm_nothing(tmp_path):
    """`python -m sweeper.status` on a local sweep: its trials' job ids are process ids, which SLURM is not asked
    about (squeue and sacct took seconds per call, and a process id can be a real job's id); the table lists every
    trial."""
    proc = run_toy(tmp_path, "x=0,1", "hydra.sweeper.mode=processes")  # a trial per process: its job id, a pid
    assert proc.returncode == 0, proc.stderr[-3000:]
    shim, called = tmp_path / "bin", tmp_path / "slurm-called"
    shim.mkdir()
    for tool in ("squeue", "sacct"):
        (shim / tool).write_text(f"#!/bin/sh\necho {tool} >> {called}\n")
        (shim / tool).chmod(0o755)
    status = subprocess.run([sys.executable, "-m", "sweeper.status", str(tmp_path / "runs" / "toy")], cwd=REPO,
                            env={**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}, capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0, status.stderr[-3000:]
    assert "2 complete" in status.stdout and not called.exists(), status.stdout


def test_a_study_s_name_says_what_was_searched_and_it_stores_its_metric_and_command(tmp_path):
    """Without hydra.sweeper.study_name: `grid-<keys>-<hash>` for a grid, `search-<keys>-<hash>` with an interval
    among the sweeps (a preset's own name with search=...); the study holds its objective's name (Optuna's
    metric_names: optuna-dashboard's axis) and the command that made it. A study an older qlora_exp named
    `sweep-<hash>` for the same command is resumed, not started again."""
    storage = f"sqlite:///{tmp_path}/study.db"

    def sweep(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(TOY), "-m", f"hydra.sweeper.storage={storage}",
                               f"hydra.sweeper.study_dir={tmp_path}/runs", *args], cwd=tmp_path, env=toy_env(tmp_path),
                              capture_output=True, text=True, timeout=240)

    assert sweep("x=0,1").returncode == 0
    assert sweep("x=0,1", "y=interval(0,1)", "hydra.sweeper.n_trials=2").returncode == 0
    names = sorted(optuna.get_all_study_names(storage))
    assert [n.rsplit("-", 1)[0] for n in names] == ["grid-x", "search-x+y"], names
    grid = optuna.load_study(study_name=names[0], storage=storage)
    assert grid.metric_names == ["objective"]  # the toy app has no `objective` key: qlora_exp's says eval_loss
    settings = f"hydra.sweeper.storage={storage} hydra.sweeper.study_dir={tmp_path}/runs"
    assert grid.user_attrs["command"] == f"python {TOY} -m x=0,1 {settings}", grid.user_attrs
    searched = optuna.load_study(study_name=names[1], storage=storage).user_attrs["command"]
    assert searched == f"python {TOY} -m x=0,1 'y=interval(0,1)' {settings} hydra.sweeper.n_trials=2", searched
    legacy = "sweep-" + names[0].rsplit("-", 1)[1]
    optuna.copy_study(from_study_name=names[0], from_storage=storage, to_storage=storage, to_study_name=legacy)
    optuna.delete_study(study_name=names[0], storage=storage)
    proc = sweep("x=0,1")
    assert proc.returncode == 0 and f"resumed study '{legacy}'" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert sorted(optuna.get_all_study_names(storage)) == sorted([legacy, names[1]])


@pytest.mark.pins_mode
@pytest.mark.parametrize("mode", ["processes", "workers"])
def test_trial_processes_cache_bytecode_where_the_environment_forbids_it(tmp_path, mode):
    """PYTHONDONTWRITEBYTECODE=1 (container images) would make every worker and trial process compile its imports
    again (16 s against 7 s on the H100): the sweep points them at ~/.cache/qlora_exp/pycache instead, and says so;
    bytecode_cache=false leaves the environment as it is."""
    env = {k: v for k, v in toy_env(tmp_path).items() if k != "PYTHONPYCACHEPREFIX"}
    env.update(PYTHONDONTWRITEBYTECODE="1", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    folder = tmp_path / "xdg" / "qlora_exp" / "pycache"
    args = ["x=0,1,2", f"hydra.sweeper.mode={mode}", "hydra.sweeper.n_jobs=2"]
    proc = subprocess.Popen(toy_args(tmp_path, *args), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-2000:]
    assert f"PYTHONDONTWRITEBYTECODE is set: trial processes cache their bytecode in {folder}" in out
    runs = [json.loads((tmp_path / "runs" / "toy" / str(n) / "metrics.json").read_text()) for n in range(3)]
    assert [(r["pycache_prefix"], r["dont_write_bytecode"]) for r in runs] == [(str(folder), False)] * 3
    assert any(r["pid"] != proc.pid for r in runs)  # a process the sweep started, not only the driver itself
    # modules the driver imported before the sweep began (it wrote nothing then): cached by the processes it started
    assert list(folder.rglob("sweeper/jobs.*.pyc")) and list(folder.rglob("hydra/core/hydra_config.*.pyc"))

    off = tmp_path / "off"
    off.mkdir()
    env["XDG_CACHE_HOME"] = str(off / "xdg")
    proc = subprocess.run(toy_args(off, *args, "hydra.sweeper.bytecode_cache=false"), cwd=off, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [json.loads((off / "runs" / "toy" / str(n) / "metrics.json").read_text()) for n in range(3)]
    assert [(r["pycache_prefix"], r["dont_write_bytecode"]) for r in runs] == [(None, True)] * 3
    assert not (off / "xdg").exists() and "PYTHONDONTWRITEBYTECODE" not in proc.stderr + proc.stdout


def test_a_sweep_says_its_final_progress_once_and_where_each_trial_logs(tmp_path):
    proc = run_toy(tmp_path, "x=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("[toy] 2/2 finished") == 1, out[-3000:]
    for n in (0, 1):
        line = next(line for line in out.splitlines() if f"trial {n} started" in line)
        log_file = Path(line.rsplit("its log: ", 1)[1])
        assert log_file == tmp_path / "runs" / "toy" / str(n) / "app.log" and log_file.is_file(), line
