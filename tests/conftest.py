"""Shared fixtures: composed configs with every path inside a temp folder, and the trials and sweeps that
several test modules assert on, each run once per session (a trial process costs ~8 s of imports).

- `default_trial`: `python -m qlora_exp` on the embedded default (150 steps), with tokens in the environment.
- `tb_sweep`: a grid of three learning rates, one trial complete, one pruned, one failed; run again (it resumes and
  runs nothing) and reported; tokens in the environment. For the TensorBoard server, the report and the grid.
The secrets scan (test_secrets.py) reads every byte both wrote.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# pytest-xdist workers (`make test` runs two) share the cores: each worker, and every trial process it starts, gets
# its share of OpenMP threads before torch is first imported. Two trials of 2 threads each on 2 cores spin against
# each other: measured here, 530 tokens/s each against 4,100 each with one thread (and 5,700 alone), which timed
# out the default trial's fixture (300 s) under the full suite. The sweeper does the same for its own slots
# (sweeper.gpus.share_cpu_threads); a value set by the user is kept.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

from qlora_exp.quiet import import_bitsandbytes  # noqa: E402  (after the thread share: it imports torch)

import_bitsandbytes()  # as a trial does, before transformers (which imports it): the tests' own imports of it ask
# the hub for no CPU kernel

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import qlora_exp  # noqa: F401,E402  (resolvers)

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO / "conf")
# short trials: what a sweep test asserts holds after 20 steps on 320 rows (a trial process is ~10 s of imports and
# ~4 s of work; the embedded default, 150 steps on 2,000 rows, runs once, as `default_trial`)
ROWS = ["data.max_train_rows=320", "data.max_eval_rows=64"]
FAST = ["trainer.max_steps=20", "trainer.eval_every=10", "trainer.save_adapter=false", *ROWS]
# tokens in the environment of the session's shared trials: no file or output they write may hold them
TOKEN, HUB_TOKEN = "hf_SECRETabc123", "hf_HUBsecret456"
TOKENS = {"HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": HUB_TOKEN}
# the sweep mode the suite runs in: the default (workers) under `make test`'s first pass, processes under its second
# (`make test-processes`, QLORA_EXP_SWEEP_MODE=processes); a test about what only a trial's own process has (its
# submitit controller, its own SLURM job, its result pickle) pins PROCESSES, and tests/test_workers.py has the
# workers' side of it
SWEEP_MODE = os.environ.get("QLORA_EXP_SWEEP_MODE") or "workers"
PROCESSES = "hydra.sweeper.mode=processes"


def once_per_run(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` once for the whole test run, shared by every pytest-xdist worker (`make test` runs two): the
    first worker to get here builds `name` under the run's common temp folder, holding a file lock; the others wait
    for it and take the same folder. A build that failed is failed for every worker (its error is kept)."""
    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process: its own temp folder
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # common to the workers of this run
    folder, done, failed = root / name, root / f"{name}.done", root / f"{name}.failed"
    with FileLock(str(root / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"{name} failed in another worker:\n{failed.read_text()}")
        if not done.exists():
            folder.mkdir(exist_ok=True)
            try:
                make(folder)
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {e}"[-3000:])
                raise
            done.touch()
    return folder


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One model cache for the whole run: the tiny model is built once (the cache builds in a temporary folder and
    moves it into place, so workers may share it)."""
    return once_per_run(tmp_path_factory, "cache", lambda folder: None)


def compose_cfg(tmp: Path, overrides=(), cache: Path | None = None):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/trial",
                                            f"paths.cache_dir={cache or tmp / 'cache'}", *overrides])


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    return lambda *overrides: compose_cfg(tmp_path, overrides, cache_dir)


def run_cli(args, cwd: Path, cache: Path | None = None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """The real entry point, as a user types it, in `cwd` (so outputs/ lands there)."""
    extra = [f"paths.cache_dir={cache}"] if cache else []
    proc = subprocess.Popen([sys.executable, "-m", "qlora_exp", *args, *extra], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every trial process it started
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(args)}\n{err[-3000:]}") from None
    finally:
        _kill_group(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # trial processes a finished driver may have left behind
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float = 240, what: str = "condition", every: float = 0.25,
             errors: tuple = (FileNotFoundError, ValueError, KeyError, StopIteration)):
    """Poll `predicate` until it returns something truthy, and return that; fail after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
        except errors:
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def read_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def only_child(folder: Path) -> Path:
    (child,) = folder.iterdir()
    return child


class FailAtStep(TrainerCallback):
    """Test only: a trial whose `value` (an interpolated config value, e.g. ${optimizer.lr}) equals `when`
    raises at optimizer step `step`, mid-training."""

    def __init__(self, value, when, step: int):
        self.fails = math.isclose(float(value), float(when))
        self.step = int(step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.fails and state.global_step >= self.step:
            raise RuntimeError(f"test failure at step {state.global_step}")


@pytest.fixture(scope="session")
def default_trial(tmp_path_factory, cache_dir) -> Path:
    """`python -m qlora_exp` on the embedded default, once per run: its run folder."""
    def make(cwd: Path) -> None:
        proc = run_cli([], cwd, cache_dir, env=TOKENS)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run,) = (cwd / "outputs" / "runs").iterdir()
        (run / "test-output.txt").write_text(proc.stdout + proc.stderr)  # for the secrets scan

    (run,) = (once_per_run(tmp_path_factory, "default_trial", make) / "outputs" / "runs").iterdir()
    return run


LR_COMPLETE, LR_FAIL, LR_PRUNE = 2e-3, 3e-3, 1e-7
TB_SWEEP_ARGS = [
    "-m", f"optimizer.lr={LR_COMPLETE},{LR_FAIL},{LR_PRUNE}", "hydra.sweeper.max_failure_rate=1.0",
    # a threshold pruner: a trial still above 6.5 at its step-10 evaluation (the untrained loss is ~6.8) stops
    "~hydra.sweeper.pruner.n_startup_trials", "~hydra.sweeper.pruner.n_warmup_steps",
    "hydra.sweeper.pruner.name=threshold", "+hydra.sweeper.pruner.upper=6.5",
    # the failing trial raises at step 12, mid-training
    "+callbacks.fail._target_=tests.conftest.FailAtStep", "+callbacks.fail.value=${optimizer.lr}",
    f"+callbacks.fail.when={LR_FAIL}", "+callbacks.fail.step=12",
    "trainer.max_steps=20", "trainer.eval_every=10", "trainer.save_adapter=false", *ROWS,
]


@pytest.fixture(scope="session")
def tb_sweep(tmp_path_factory, cache_dir) -> Path:
    """A grid of three learning rates with one trial of each end: complete, pruned (threshold at step 10), failed
    (at step 12); then the same command again (a resume that runs nothing) and `python -m qlora_exp.report` on it,
    tokens in every environment; once per run. Its working folder, with what the three commands printed in
    outputs/test-output-*.txt. Used by test_tensorboard, test_report, test_sweeper and test_secrets."""
    def make(cwd: Path) -> None:
        env = {**TOKENS, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        for name in ("first", "again"):
            proc = run_cli(TB_SWEEP_ARGS, cwd, cache_dir, env=env, timeout=900)
            assert proc.returncode == 0, proc.stderr[-3000:]
            (cwd / "outputs" / f"test-output-{name}.txt").write_text(proc.stdout + proc.stderr)
        sweep = only_child(cwd / "outputs" / "multirun")
        report = subprocess.run([sys.executable, "-m", "qlora_exp.report", str(sweep)], cwd=cwd, text=True,
                                capture_output=True, env={**os.environ, **TOKENS}, timeout=300)
        assert report.returncode == 0, report.stderr[-3000:]
        (cwd / "outputs" / "test-output-report.txt").write_text(report.stdout + report.stderr)

    return once_per_run(tmp_path_factory, "tb_sweep", make)


def cli_in_process(args, cwd: Path, env=None) -> subprocess.CompletedProcess:
    """The same entry point as `run_cli` (qlora_exp.__main__.cli), called in this process: for commands that are
    refused before any trial starts, where a new interpreter would only add its start-up time."""
    import contextlib
    import io

    from hydra.core.global_hydra import GlobalHydra

    from qlora_exp.__main__ import cli

    out, err, code = io.StringIO(), io.StringIO(), 0
    old_cwd, old_argv, old_env = os.getcwd(), sys.argv, dict(os.environ)
    old_bytecode = sys.pycache_prefix, sys.dont_write_bytecode  # a command's bytecode cache (sweeper/bytecode.py)
    try:
        os.chdir(cwd)
        sys.argv = ["qlora_exp", *args]
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001  (a traceback, as the user would see it)
                import traceback

                traceback.print_exc()
                code = 1
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
        os.environ.clear()
        os.environ.update(old_env)
        sys.pycache_prefix, sys.dont_write_bytecode = old_bytecode
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(["qlora_exp", *args], code, out.getvalue(), err.getvalue())


def pytest_collection_modifyitems(config, items):
    """The fast tier first, then the slow one, in one process (one start-up of torch and transformers, not two): a
    failure of a fast test shows within the first minute of `make test`."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)  # stable: file order kept in each tier
