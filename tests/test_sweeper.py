"""The Optuna sweeper end to end, through `python -m qlora_exp -m ...` on the embedded default."""
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from omegaconf import OmegaConf
from optuna.trial import TrialState

from sweeper.naming import hydra_value
from sweeper.policy import count_finished
from tests.conftest import ROWS, SWEEP_MODE, cli_in_process, read_metrics, run_cli, wait_for


def load_study(cwd: Path) -> optuna.Study:
    from sweeper.storage import build_storage  # (retries a new database's schema race with a starting driver)

    storage = build_storage(f"sqlite:///{cwd}/outputs/optuna.db")
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def sweep_dir(cwd: Path) -> Path:
    (folder,) = (cwd / "outputs" / "multirun").iterdir()
    return folder


def test_hydra_value_quotes_for_the_override_grammar():
    assert hydra_value("a'b,c=d") == "'a\\'b,c=d'" and hydra_value(1e-05) == "1e-05"
    assert hydra_value({"name": "median", "n": 3}) == "{name:'median',n:3}" and hydra_value(None) == "null"


def test_count_finished_skips_failures_that_were_retried_and_interrupts():
    """A retried failure counts once (its retry), an interrupted trial never (Optuna's retry_history marks both)."""
    from sweeper.policy import RETRY_ONCE, fail

    study = optuna.create_study()
    d = {"x": optuna.distributions.FloatDistribution(0, 1)}
    failed = study.ask(d)
    study.tell(failed, state=TrialState.FAIL)
    RETRY_ONCE(study, study.trials[failed.number])
    retry = study.ask(d)  # the WAITING retry comes first, with the same x
    assert retry.params == failed.params and study.trials[retry.number].system_attrs["retry_history"] == [0]
    study.tell(retry, 0.5)
    study.tell(study.ask(d), state=TrialState.PRUNED)
    assert count_finished(study) == 2
    cut = study.ask(d)
    fail(study, cut._trial_id, cut.number, "sweep interrupted", interrupted=True)
    assert count_finished(study) == 2 and study.trials[-1].state == TrialState.WAITING
    RETRY_ONCE(study, study.trials[retry.number])  # a trial retried once already is not queued again
    assert [t.state for t in study.trials].count(TrialState.WAITING) == 1


@pytest.mark.slow
def test_grid_of_three_is_exactly_three_trials_and_a_rerun_runs_none(tb_sweep):
    """`-m optimizer.lr=a,b,c` (every parameter discrete: a grid): three trials, one complete, one pruned, one failed
    mid-training with its own error line; the same command again resumes the study and runs nothing."""
    from tests.conftest import LR_COMPLETE, LR_FAIL, LR_PRUNE

    study = load_study(tb_sweep)
    by_lr = {t.params["optimizer.lr"]: t for t in study.trials}
    assert len(study.trials) == 3 and sorted(by_lr) == sorted([LR_COMPLETE, LR_FAIL, LR_PRUNE])
    assert [by_lr[lr].state for lr in (LR_COMPLETE, LR_PRUNE, LR_FAIL)] == [TrialState.COMPLETE, TrialState.PRUNED,
                                                                          TrialState.FAIL]
    assert "RuntimeError: test failure at step 12" in by_lr[LR_FAIL].user_attrs["fail_reason"], by_lr[LR_FAIL].user_attrs
    folder = sweep_dir(tb_sweep)
    complete = by_lr[LR_COMPLETE]
    m = read_metrics(folder / str(complete.number))
    assert m["status"] == "complete" and m["eval_loss"] == pytest.approx(complete.value)
    for t in study.trials:
        assert OmegaConf.load(folder / str(t.number) / "config.yaml").optimizer.lr == t.params["optimizer.lr"]
    results = OmegaConf.load(folder / "optimization_results.yaml")
    assert results.best.value == complete.value and results.best.number == complete.number
    assert (results.trials.complete, results.trials.pruned, results.trials.fail) == (1, 1, 1)
    assert "optimizer.lr=" in results.best.command and "trainer.max_steps=20" in results.best.command
    # an interpolation in it reads back as written, quoted for the shell (bash would try to expand ${...})
    assert "+callbacks.fail.value=${optimizer.lr}" in shlex.split(results.best.command)
    assert "'+callbacks.fail.value=${optimizer.lr}'" in results.best.command
    # the second run of the same command: resumed, nothing trained again (metrics written by the first run only)
    again = (tb_sweep / "outputs" / "test-output-again.txt").read_text()
    first_end = max(t.datetime_complete for t in study.trials)
    assert "resumed study" in again and "3 of 3 trials finished" in again, again[-2000:]
    assert not re.search(r"trial \d+ started \(", again), again[-2000:]
    for t in study.trials:
        assert (folder / str(t.number) / "metrics.json").stat().st_mtime <= first_end.timestamp() + 1


@pytest.mark.slow
def test_tpe_with_pruning_on_two_slots(tmp_path, cache_dir):
    args = ["-m", "search=rank_alpha_lr", "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.sampler.seed=0",  # the seed this test was measured with (null: derived from the study)
            "hydra.sweeper.pruner.n_startup_trials=2", "hydra.sweeper.pruner.n_warmup_steps=10",
            "trainer.max_steps=30", "trainer.eval_every=10", "trainer.save_adapter=false", *ROWS]
    proc = run_cli(args, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the preset's sampler and pruner, as the driver built them
    assert "sampler tpe, pruner percentile, 2 slot(s)" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    # the driver shows each running trial's evaluations as they come, whichever worker runs it
    shown = re.findall(r"\] trial (\d+) \(lora\.r=\d+ .*\): step (\d+)/30, eval loss (\d\.\d+)", proc.stdout + proc.stderr)
    assert {step for _, step, _ in shown} >= {"10"} and len({n for n, _, _ in shown}) >= 2, proc.stdout[-3000:]
    study = load_study(tmp_path)
    states = [t.state for t in study.trials]
    assert len(states) == 6 and TrialState.FAIL not in states
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.number, t.params, t.intermediate_values) for t in study.trials]
    folder = sweep_dir(tmp_path)
    for t in pruned:  # stopped early, folder and TensorBoard run kept, the step it reached stored
        assert t.user_attrs["pruned_at_step"] < 30 and max(t.intermediate_values) == t.user_attrs["pruned_at_step"]
        assert read_metrics(folder / str(t.number))["status"] == "pruned"
    # the default config under the same trainer settings: the search found better
    default = run_cli(["trainer.max_steps=30", "trainer.eval_every=10", "trainer.save_adapter=false", *ROWS], tmp_path,
                      cache_dir)
    assert default.returncode == 0, default.stderr[-2000:]
    default_loss = read_metrics(next((tmp_path / "outputs" / "runs").iterdir()))["eval_loss"]
    assert study.best_value < default_loss
    # two slots: from the first start until the last start, a slot is never left idle
    complete = sorted(study.trials, key=lambda t: t.datetime_start)
    ends = sorted(t.datetime_complete.timestamp() for t in complete)
    for t in complete[2:]:
        start = t.datetime_start.timestamp()
        assert min(abs(start - e) for e in ends) < 3.0, "a slot waited after a trial ended"
    for t in complete[2:]:  # never more than two at once, and the other slot busy too when one starts (or within
        at = t.datetime_start.timestamp() + 0.01  # 3 s: both slots can free up at once, pruned trials end together)
        assert sum(u.datetime_start.timestamp() <= at < u.datetime_complete.timestamp() for u in complete) <= 2
        assert sum(u.datetime_start.timestamp() <= at + 3.0 and at < u.datetime_complete.timestamp()
                   for u in complete) >= 2


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path, cache_dir):
    args = ["-m", "lora.r=4,8", "hydra.sweeper.stale_after_s=3", "trainer.max_steps=30", "trainer.eval_every=15",
            "trainer.save_adapter=false", *ROWS, f"paths.cache_dir={cache_dir}"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "qlora_exp", *args], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    def one_finished_one_running():
        if not (tmp_path / "outputs" / "optuna.db").exists():
            return False
        trials = load_study(tmp_path).trials
        # a second trial submitted (its job id recorded): killed before that, it never started and is simply retried
        return [t.state for t in trials].count(TrialState.COMPLETE) >= 1 and any(
            t.state == TrialState.RUNNING and "job_id" in t.user_attrs for t in trials)
    try:
        wait_for(one_finished_one_running, timeout=300, what="one finished trial and a second one running",
                 errors=(ValueError, KeyError, sqlalchemy.exc.SQLAlchemyError))
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, mid-sweep (its trials run in sessions of their own)
        driver.wait()
    before = {t.number: t for t in load_study(tmp_path).trials}
    finished = {n for n, t in before.items() if t.state == TrialState.COMPLETE}
    metrics_mtime = {n: (sweep_dir(tmp_path) / str(n) / "metrics.json").stat().st_mtime for n in finished}
    assert TrialState.RUNNING in [t.state for t in before.values()], before
    # the killed driver's trial process runs on (its own session); the rerun, at once (the dead driver ran on this
    # host: no wait for stale_after_s), watches it to its end or completes it from its result: nothing run again
    proc = run_cli(args[:-1], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = load_study(tmp_path).trials
    if SWEEP_MODE == "processes":
        assert "not run again" in proc.stdout or "completed from its result" in proc.stdout, proc.stdout[-3000:]
        assert [t.state for t in after] == [TrialState.COMPLETE] * 2, [(t.number, t.state, t.user_attrs) for t in after]
    else:  # the one worker is the driver: its trial died with it, is FAIL once and its retry trains the point
        cut = [t for t in after if t.state == TrialState.FAIL]
        assert len(cut) == 1 and "driver stopped" in cut[0].user_attrs["fail_reason"], [(t.number, t.state) for t in after]
        assert [t.state for t in after if t not in cut] == [TrialState.COMPLETE] * 2
        assert [t.system_attrs.get("retry_history") for t in after if t.number > cut[0].number] == [[cut[0].number]]
    assert sorted(t.params["lora.r"] for t in after if t.state == TrialState.COMPLETE) == [4, 8]
    for n in finished:  # finished trials were not run again
        assert (sweep_dir(tmp_path) / str(n) / "metrics.json").stat().st_mtime == metrics_mtime[n]


def test_bad_sweeper_settings_are_one_line_errors(tmp_path):
    for args, needle in [(["hydra.sweeper.sampler.name=annealing"], "hydra.sweeper.sampler.name='annealing'"),
                         (["hydra.sweeper.study_name=../escape"], "hydra.sweeper.study_name='../escape'"),
                         (["hydra.sweeper.n_jobs=0"], "hydra.sweeper.n_jobs=0"),
                         (["optimizer.lr=interval(5,1)"], "key 'optimizer.lr': interval(5,1) has low > high"),
                         (["lora.r=choice()"], "lora.r='choice()' is not accepted: Hydra's override grammar")]:
        proc = cli_in_process(["-m", "lora.r=8,16", *args], tmp_path)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
        assert not (tmp_path / "outputs" / "optuna.db").exists() or not optuna.get_all_study_names(
            f"sqlite:///{tmp_path}/outputs/optuna.db")


@pytest.mark.parametrize("mode", ["sweep", "single"])
def test_a_sweeps_checks_import_torch_from_the_bytecode_cache(tmp_path, cache_dir, mode):
    """With PYTHONDONTWRITEBYTECODE set, the command's checks (the tokenizer for the length check imports
    transformers and torch) ran before the sweeper pointed the driver at its bytecode cache, and with one worker the
    driver is the worker: torch compiled from source at every sweep (8.1 s of the H100's 18 s first ask). A single
    run (no -m) never used the cache at all: every `python -m qlora_exp` compiled the stack again."""
    folder = tmp_path / "xdg" / "qlora_exp" / "pycache"
    args = ["lora.r=8", "trainer.max_steps=1", "trainer.save_adapter=false"]
    sweep = ["-m", f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db"] if mode == "sweep" else []
    proc = run_cli([*sweep, *args], tmp_path, cache_dir,
                   env={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": "", "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    who = "trial processes cache their" if mode == "sweep" else "this run caches its"
    assert out.count(f"PYTHONDONTWRITEBYTECODE is set: {who} bytecode in {folder}") == 1, out[-3000:]
    assert ("1/1 finished: 1 complete" if mode == "sweep" else "trial complete: eval_loss") in out, out[-3000:]
    for module in ("torch/__init__", "transformers/configuration_utils", "transformers/tokenization_utils_base"):
        assert list(folder.rglob(f"{module}.*.pyc")), module
