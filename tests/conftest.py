"""Shared fixtures: composed configs with every path inside a temp folder, and one real trial."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import qlora_exp  # noqa: F401  (resolvers)

CONF_DIR = str(Path(qlora_exp.__file__).resolve().parent.parent / "conf")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One model cache for the whole session: the tiny model is built once."""
    return tmp_path_factory.mktemp("cache")


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


@pytest.fixture(scope="session")
def default_trial(tmp_path_factory, cache_dir) -> Path:
    """`python -m qlora_exp` on the embedded default, once per session: its run folder."""
    cwd = tmp_path_factory.mktemp("default_trial")
    proc = run_cli([], cwd, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((cwd / "outputs" / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


def read_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())
