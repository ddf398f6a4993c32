"""hydra-submitit-launcher's own tests, run against qlora_exp's launcher (`hydra/launcher=local|slurm`, also named
`submitit_local|submitit_slurm`), which replaces it.

Source: facebookresearch/hydra, plugins/hydra_submitit_launcher/tests/test_submitit_launcher.py at commit
2c03d1b925fe239e0b67b923699d4027685f198f (v1.3.2's file has no case this one lacks: cases were only added since).
Every case is here; each docstring names its peer case and says where ours differs on purpose. Hydra's own
`LauncherTestSuite` and `IntegrationTestSuite` run through Hydra's basic sweeper, so they drive
`QLoRASubmititLauncher.launch` (sweeper.jobs.launch_batch) with real submitit local processes.
"""
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import MagicMock, patch

import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from hydra.test_utils.test_utils import run_python_script
from omegaconf import OmegaConf

from hydra_plugins.qlora_exp_sweeper.qlora_exp_launcher import QLoRASubmititLauncher
from sweeper.jobs import make_executor

EXAMPLE = Path(__file__).resolve().parent / "submitit_example"
LAUNCHERS = ("local", "submitit_local", "slurm", "submitit_slurm")
TARGET = "hydra_plugins.qlora_exp_sweeper.qlora_exp_launcher.QLoRASubmititLauncher"

pytestmark = pytest.mark.filterwarnings("ignore:pkg_resources is deprecated as an API:Warning")


def example_cfg(*overrides: str):
    """The peer's example config (it picks `hydra/launcher: submitit_slurm`) composed with Hydra's config,
    as a run composes it."""
    with initialize_config_dir(config_dir=str(EXAMPLE), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("cls", [QLoRASubmititLauncher])
def test_discovery(cls) -> None:
    """Peer: test_discovery (parametrized with its LocalLauncher and SlurmLauncher). Ours is one class for both,
    picked by the config's `cluster` key, so the case is ours alone; added: every launcher name the peer's configs
    use, and ours, composes to that class with the right cluster (Plugins only lists classes, not the names)."""
    assert cls.__name__ in [x.__name__ for x in Plugins.instance().discover(Launcher)]
    for name in LAUNCHERS:
        launcher = example_cfg(f"hydra/launcher={name}").hydra.launcher
        assert launcher._target_ == TARGET, name
        assert launcher.cluster == ("slurm" if "slurm" in name else "local"), name


@pytest.fixture
def fresh_version_base():
    """Hydra's VersionBase as a fresh process has it (unset: 1.1's defaults, so a job changes into its folder), which
    LauncherTestSuite's assertions expect. A compose with version_base="1.3" earlier in this process (tests/
    test_configs.py, example_cfg here) leaves its own in that singleton, and jobs get it with Singleton.get_state()."""
    import hydra.version

    base = hydra.version.VersionBase.instance()
    saved, base.version_base = base.version_base, hydra.version._UNSPECIFIED_
    yield
    base.version_base = saved


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_version_base")
@pytest.mark.parametrize("launcher_name, overrides", [("submitit_local", ["hydra.launcher.timeout_min=2"])])
class TestSubmititLauncher(LauncherTestSuite):
    """Peer: TestSubmititLauncher, Hydra's LauncherTestSuite with `submitit_local` and `hydra.launcher.timeout_min=2`
    (`local` is the same config under our own name: test_discovery composes both). Jobs are submitit local processes,
    one per job (the peer submits an array with map_array; ours submits each job, as the sweeper's slots do)."""


@pytest.mark.slow
@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [
    ({}, ["-m", "hydra/hydra_logging=disabled", "hydra/job_logging=disabled", f"hydra/launcher={name}",
          "hydra.launcher.gpus_per_node=0", "hydra.launcher.timeout_min=1"])
    for name in ("submitit_local",)])
class TestSubmititLauncherIntegration(IntegrationTestSuite):
    """Peer: TestSubmititLauncherIntegration, Hydra's IntegrationTestSuite (an app in a fresh interpreter) with the
    peer's flags (`local` is the same config: test_discovery composes it)."""


@pytest.mark.parametrize("python", [None, "/opt/venv/bin/python"])
def test_slurm_python_parameter(tmp_path: Path, python) -> None:
    """Peer: test_slurm_python_parameter. `python` is SlurmExecutor's own argument: it goes to the executor's
    init as slurm_python, None included, and not to update_parameters (where submitit raised a NameError on it).
    Ours differs on purpose: slurm_max_num_timeout=3, not the peer's 0 (trials checkpoint and resume), and the
    folder is `submitit_folder`'s null default, the folder the caller gives (<sweep folder>/.submitit, flat: the
    sweeper and the SLURM tests read job logs there), not `${hydra.sweep.dir}/.submitit/%j`."""
    executor = MagicMock()
    auto_executor = MagicMock(return_value=executor)
    cfg = example_cfg(f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.launcher.python={python or 'null'}")
    with patch.object(submitit, "AutoExecutor", auto_executor):
        assert make_executor(cfg.hydra.launcher, tmp_path / "sweep" / ".submitit") == (executor, "slurm")
    auto_executor.assert_called_once_with(cluster="slurm", folder=str(tmp_path / "sweep" / ".submitit"),
                                          slurm_max_num_timeout=3, slurm_python=python)
    kwargs = executor.update_parameters.call_args.kwargs
    assert "slurm_python" not in kwargs and "python" not in kwargs and "slurm_max_num_timeout" not in kwargs
    # the rest goes to update_parameters as the peer passes it: base keys as they are, SLURM keys as slurm_<key>
    assert kwargs["timeout_min"] == 240 and kwargs["name"] == cfg.hydra.job.name
    assert "slurm_partition" in kwargs and kwargs["slurm_partition"] is None and "slurm_srun_args" in kwargs


@pytest.mark.slow
def test_submitit_folder_with_job_id(tmp_path: Path) -> None:
    """Ours (the peer's default folder, `${hydra.sweep.dir}/.submitit/%j`, tested by test_slurm_python_parameter's
    peer): a `submitit_folder` with %j reaches submitit as it is, and submitit puts each job's files under its id."""
    folder = f"{tmp_path}/logs/%j"
    executor, kind = make_executor(OmegaConf.create({"_target_": TARGET, "cluster": "local",
                                                     "submitit_folder": folder}), tmp_path / "unused")
    assert kind == "local" and str(executor.folder) == folder
    job = executor.submit(int, "7")
    assert job.result() == 7
    assert (tmp_path / "logs" / str(job.job_id) / f"{job.job_id}_0_result.pkl").exists()
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize("tasks_per_node", [1, None])
def test_slurm_tasks_per_node_is_optional_with_compatible_default(tmp_path: Path, tasks_per_node) -> None:
    """Peer: test_slurm_tasks_per_node_is_optional_with_compatible_default. The default is 1 and a null is passed
    on to update_parameters as None (submitit then leaves --ntasks-per-node out of the sbatch script; checked on
    submitit's real SLURM executor where srun is installed)."""
    assert example_cfg().hydra.launcher.tasks_per_node == 1
    cfg = example_cfg(f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.launcher.tasks_per_node={tasks_per_node or 'null'}")
    executor = MagicMock()
    with patch.object(submitit, "AutoExecutor", return_value=executor):
        make_executor(cfg.hydra.launcher, tmp_path / "sweep" / ".submitit")
    kwargs = executor.update_parameters.call_args.kwargs
    assert "tasks_per_node" in kwargs and kwargs["tasks_per_node"] == tasks_per_node
    if shutil.which("srun"):
        real, _ = make_executor(cfg.hydra.launcher, tmp_path / "sweep" / ".submitit")
        sbatch = real._executor._make_submission_file_text("true", "uid")
        assert ("--ntasks-per-node=1" in sbatch) == (tasks_per_node == 1), sbatch


@pytest.mark.parametrize("launcher, override, why", [
    ("local", "+hydra.launcher.partition=gpu", "a key of hydra/launcher=local"),  # a SLURM key on local
    ("slurm", "+hydra.launcher.tasks_per_nod=2", "a key of hydra/launcher=slurm"),
    ("slurm", "hydra.launcher.timeout_min=1.5", "an integer"),
    ("slurm", "hydra.launcher.max_num_timeout=null", "a value"),
])
def test_bad_launcher_key_is_one_line(launcher, override, why) -> None:
    """Ours: the peer's structured config refuses an unknown key or a wrong type when Hydra composes; our YAML
    configs take `+hydra.launcher.<key>=`, so make_executor refuses it: one line naming the key, the value and what
    is accepted, an error qlora_exp's sweeper reports as such (a SweeperConfigError) and Hydra prints as one line
    (a CompactHydraException), not submitit's NameError or AssertionError."""
    from hydra.errors import CompactHydraException

    from sweeper.errors import SweeperConfigError

    cfg = example_cfg(f"hydra/launcher={launcher}", override)
    key, value = override.lstrip("+").split("=")
    with pytest.raises(SweeperConfigError) as e:
        make_executor(cfg.hydra.launcher, Path("/nonexistent"))
    assert isinstance(e.value, CompactHydraException)
    message = str(e.value)
    assert message.startswith(f"{key}=") and f"is not accepted: {why}" in message and "\n" not in message
    assert f"={OmegaConf.create(f'v: {value}').v!r} is not accepted" in message
    if "a key of" in why:
        accepted = message.split(" (", 1)[1].rstrip(")").split(", ")
        assert "timeout_min" in accepted and "trial_overrides" in accepted
        assert ("partition" in accepted) == ("python" in accepted) == (launcher == "slurm")


@pytest.mark.slow
def test_bad_launcher_key_on_the_command_line(tmp_path: Path) -> None:
    """Ours, end to end through Hydra's basic sweeper (the peer's example app): one line on stderr, no traceback,
    no job started."""
    proc = subprocess.run([sys.executable, "-W", "ignore", str(EXAMPLE / "my_app.py"), "-m",
                           f"hydra.sweep.dir={tmp_path}", "hydra/launcher=submitit_local", "+hydra.launcher.partition=gpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    hint = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."  # Hydra's, after any error
    lines = [line for line in proc.stderr.splitlines() if line.strip() and line != hint]
    assert len(lines) == 1 and lines[0].startswith("hydra.launcher.partition='gpu' is not accepted: a key of "
                                                   "hydra/launcher=local (_target_, cluster,"), proc.stderr
    assert not (tmp_path / ".submitit").exists()


@pytest.mark.slow
def test_example(tmp_path: Path) -> None:
    """Peer: test_example: its example app (tests/peer/submitit_example/, copied unchanged; its config picks
    submitit_slurm) swept with `hydra/launcher=submitit_local`. The peer only checks the exit status; added: the
    job ran as a submitit job (JobEnvironment in the job's log) with the example's task."""
    run_python_script([str(EXAMPLE / "my_app.py"), "-m", f"hydra.sweep.dir={tmp_path}", "hydra/launcher=submitit_local"],
                      allow_warnings=True)
    job_log = (tmp_path / "0" / "my_app.log").read_text()
    assert "executing task 1, with JobEnvironment(job_id=" in job_log, job_log
    assert list((tmp_path / ".submitit").glob("*_0_result.pkl"))
