"""A trial as a submitit job: compose the trial's config in the job's process and run Hydra's task.

The same callable runs as a local process (submitit's LocalExecutor) or a SLURM job (SlurmExecutor),
like hydra-submitit-launcher's, but one trial per job so the sweeper can keep every slot busy.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, run_job, setup_globals
from omegaconf import DictConfig, open_dict

from sweeper.compose import composer

log = logging.getLogger(__name__)


class TrialJob:
    def __init__(self, hydra_context: Any, task_function: Any, config: DictConfig):
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def __call__(self, overrides: list[str], job_num: int, singleton_state: dict) -> JobReturn:
        import submitit

        try:
            env = submitit.JobEnvironment()
            cluster, job_id = env.cluster, env.job_id
        except RuntimeError:  # not a submitit job: a sweep worker that is the driver's own process (sweeper.workers)
            cluster, job_id = None, str(os.getpid())
        if cluster == "local":  # a killed controller takes its trial with it
            from sweeper.local_jobs import die_with_parent

            die_with_parent()
        Singleton.set_state(singleton_state)
        setup_globals()
        cfg = composer(self.hydra_context.config_loader, self.config)(list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.id = job_id
            cfg.hydra.job.num = job_num
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=cfg,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    def checkpoint(self, *args: Any, **kwargs: Any):
        """On preemption or timeout, SLURM requeues the same trial; it resumes from its last checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# SLURM states of a job that ended without finishing (`CANCELLED by 0` reads as CANCELLED)
DEAD_STATES = ("CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
               "INTERRUPTED")
NO_RESULT = "the trial's process ended without a result"


def job_result(job):
    """`job.result()`, less submitit's 15 s wait for a result file that a dead job will never write: a local job
    whose process has exited (it writes its result before it exits), or a SLURM job in a failed state. A
    COMPLETED SLURM job still gets the wait (a shared file system can show its result late)."""
    import submitit

    if not job.paths.result_pickle.exists():
        state = str(job.state).split(" ", 1)[0]
        if isinstance(job, submitit.LocalJob) or state in DEAD_STATES:
            job._results_timeout_s = 0
    try:
        return job.result()
    except submitit.core.utils.UncompletedJobError as e:
        if not job.paths.result_pickle.exists():
            lines = str(e).splitlines()
            why = ("it exited early, was killed or ran out of memory" if isinstance(job, submitit.LocalJob)
                   else f"job state: {job.state}")
            raise submitit.core.utils.UncompletedJobError("\n".join([f"{NO_RESULT} ({why})", *lines[2:]])) from None
        raise


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_thread_exports(cpus_per_task, setup) -> list[str]:
    """sbatch script lines giving a trial's OpenMP/MKL as many threads as the CPUs SLURM gave its job
    (`cpus_per_task`), unless the user's own setup lines set them. Without them torch starts one thread per core of
    the node, and trials sharing a node spin against each other (10x slower trials seen on 2 cores)."""
    if not cpus_per_task:
        return []
    return [f"export {var}={int(cpus_per_task)}" for var in THREAD_VARS
            if not any(f"{var}=" in line for line in setup or [])]


# hydra-submitit-launcher's keys (hydra_plugins/hydra_submitit_launcher/config.py, hydra commit 2c03d1b): both
# launchers take BaseQueueConf's, passed to submitit under these names; SLURM also takes SlurmQueueConf's own, passed
# as slurm_<key>, except the SlurmExecutor(...) arguments INIT_KEYS. A null is passed on as the peer does (submitit
# reads it as "not set").
BASE_KEYS = ("submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
             "name", "stderr_to_stdout")
SLURM_KEYS = ("partition", "qos", "comment", "constraint", "exclude", "gres", "cpus_per_gpu", "gpus_per_task",
              "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s", "max_num_timeout", "python",
              "additional_parameters", "array_parallelism", "setup", "srun_args")
INIT_KEYS = ("max_num_timeout", "python")
# qlora_exp's own: `cluster` picks the executor (the peer picks it by _target_); the sweeper reads the other two
OWN_KEYS = ("_target_", "cluster", "trial_overrides", "study_storage")
# the peer's launcher classes, should its configs reach qlora_exp's sweeper: the same keys, the kind from the class
PEER_TARGETS = {"hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher": "local",
                "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher": "slurm"}
OUR_TARGET = "hydra_plugins.qlora_exp_sweeper.qlora_exp_launcher.QLoRASubmititLauncher"
# what a value must be, where submitit would otherwise fail later with an assertion or a type error
INT_KEYS = ("timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "nodes", "cpus_per_gpu",
            "gpus_per_task", "signal_delay_s", "max_num_timeout", "array_parallelism")
LIST_KEYS = ("setup", "srun_args", "trial_overrides")
# not Optional in the peer's dataclasses (its config refuses a null); a null here would become submitit's defaults
# (a 2- or 5-minute time limit): refused too. submitit_folder and name: null is ours to fill in.
REQUIRED_KEYS = ("timeout_min", "nodes", "stderr_to_stdout", "signal_delay_s", "max_num_timeout",
                 "additional_parameters", "array_parallelism")
LOCAL_TIMEOUT_MIN = 24 * 60  # a launcher without timeout_min (Hydra's basic one): a day


@functools.cache
def _error_class():
    """A SweeperConfigError (qlora_exp's sweeper reports it in one line, exit 2) that Hydra itself also prints as
    one line (a CompactHydraException) on the basic sweeper's path."""
    from hydra.errors import CompactHydraException

    from sweeper.errors import SweeperConfigError

    class LauncherConfigError(SweeperConfigError, CompactHydraException):
        pass

    return LauncherConfigError


def launcher_error(key: str, value: Any, accepted: str) -> Exception:
    return _error_class()(f"hydra.launcher.{key}", value, accepted)


def launcher_params(launcher: DictConfig | dict | None) -> tuple[str, dict[str, Any]]:
    """`hydra.launcher` as (kind, plain values), checked: a key of neither launcher's list, or a value of the wrong
    kind, is one line naming it. qlora_exp's own keys are not returned (the sweeper reads them itself). Another
    launcher than ours or the peer's (Hydra's basic one, joblib, ...): local processes, its keys unused. The sweeper
    may call this before it opens its storage, to refuse a bad launcher setting before anything is written."""
    from omegaconf import OmegaConf

    if launcher is None:
        return "local", {}
    target = str(launcher.get("_target_") or "")
    if target != OUR_TARGET and target not in PEER_TARGETS and "cluster" not in launcher:
        return "local", {}
    kind = launcher.get("cluster") or PEER_TARGETS.get(target, "local")
    if kind not in ("local", "slurm"):
        raise launcher_error("cluster", kind, "local (trials as local processes) or slurm (trials as SLURM jobs)")
    accepted = (*OWN_KEYS, *BASE_KEYS, *(SLURM_KEYS if kind == "slurm" else ()))
    params: dict[str, Any] = {}
    for key in launcher:
        if key not in accepted:
            value = OmegaConf.to_container(launcher)[key] if OmegaConf.is_config(launcher) else launcher[key]
            raise launcher_error(key, value, f"a key of hydra/launcher={kind} ({', '.join(sorted(accepted))})")
        if key in OWN_KEYS:
            continue
        value = launcher[key]
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if value is None and key in REQUIRED_KEYS:
            raise launcher_error(key, value, "a value (hydra-submitit-launcher's config has no null for it either)")
        if value is not None:
            if key in INT_KEYS and (isinstance(value, bool) or not isinstance(value, int)):
                raise launcher_error(key, value, "an integer, or null")
            if key == "mem_gb" and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise launcher_error(key, value, "a number of GB, or null")
            if key == "stderr_to_stdout" and not isinstance(value, bool):
                raise launcher_error(key, value, "true or false")
            if key in LIST_KEYS and not isinstance(value, list):
                raise launcher_error(key, value, "a list, e.g. [a, b], or null")
            if key == "additional_parameters" and not isinstance(value, dict):
                raise launcher_error(key, value, "a mapping of sbatch options, e.g. {mail-user: me@lab.org}")
        params[key] = value
    if kind == "local" and params.get("nodes") not in (None, 1):
        raise launcher_error("nodes", params["nodes"], "1 for local processes (hydra/launcher=slurm for more)")
    return kind, params


def make_executor(launcher: DictConfig | None, folder: Path):
    """A submitit executor from `hydra.launcher` (conf/hydra/launcher/), as hydra-submitit-launcher builds its own:
    `cluster: slurm` -> AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=..., slurm_python=...), every
    other key, null included, to update_parameters (non-base keys as slurm_<key>); else local processes through
    submitit's LocalExecutor (sweeper.local_jobs: not AutoExecutor, the sweeper sets each local slot's `visible_gpus`), its keys less the
    nulls (AutoExecutor drops those too). `submitit_folder` null: `folder`; a %j in it is the job's id."""
    import submitit

    kind, params = launcher_params(launcher)
    folder_name = str(params.pop("submitit_folder", None) or folder)
    if kind == "slurm":
        init = {f"slurm_{k}": params.pop(k) for k in INIT_KEYS if k in params}
        executor = submitit.AutoExecutor(folder=folder_name, cluster="slurm", **init)
        if "setup" in params or params.get("cpus_per_task"):
            exports = cpu_thread_exports(params.get("cpus_per_task"), params.get("setup"))
            params["setup"] = [*exports, *(params.get("setup") or [])] if exports else params.get("setup")
        executor.update_parameters(**{k if k in BASE_KEYS else f"slurm_{k}": v for k, v in params.items()})
        return executor, "slurm"
    from sweeper.local_jobs import SessionLocalExecutor

    executor = SessionLocalExecutor(folder=folder_name)  # trials out of the terminal's reach: Ctrl-C is the driver's
    params.setdefault("timeout_min", LOCAL_TIMEOUT_MIN)  # qlora_exp's basic launcher path: a day
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor, "local"


def launch_batch(launcher, job_overrides, initial_job_idx: int) -> list[JobReturn]:
    """Hydra's Launcher.launch for the basic sweeper (hydra-submitit-launcher's `launch`): submit the batch, one job
    per override list, and wait for all of it."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, filter_overrides

    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:  # as the peer: an octal mode for the sweep folder
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    executor, kind = make_executor(config.hydra.launcher, sweep_dir / ".submitit")
    log.info("Submitit '%s' sweep output dir : %s", kind, sweep_dir)
    job = TrialJob(launcher.hydra_context, launcher.task_function, config)
    extra = app_trial_overrides(config)
    jobs = []
    for i, overrides in enumerate(job_overrides):
        log.info("\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(overrides)))
        jobs.append(executor.submit(job, [*overrides, *extra], initial_job_idx + i, Singleton.get_state()))
    for j in jobs:  # submitit's own wait looks once a second: a local batch of instant jobs is done sooner
        while not j.done():
            time.sleep(0.1 if kind == "local" else 1.0)
    return [job_result(j) for j in jobs]


def app_trial_overrides(config: DictConfig) -> list[str]:
    """`hydra.launcher.trial_overrides` that this app's config can take. slurm.yaml's default
    (trainer.save_checkpoints=true) is qlora_exp's: another app (hydra-submitit-launcher's example) would fail every
    job on it, so an override of a key its config does not have is left out, with a warning; `+key=`, `++key=`,
    `~key` and config groups are kept."""
    kept = []
    for override in config.hydra.launcher.get("trial_overrides") or []:
        key = str(override).split("=", 1)[0]
        if key.startswith(("+", "~")) or key in config.hydra.runtime.choices or config_has_key(config, key):
            kept.append(str(override))
        else:
            log.warning("hydra.launcher.trial_overrides: %s left out: this app's config has no %s", override, key)
    return kept


_ABSENT = object()


def config_has_key(config: DictConfig, key: str) -> bool:
    """`key` is in the app's config (a `???` value counts: there, to be set)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.select(config, key, default=_ABSENT, throw_on_missing=True,
                                throw_on_resolution_failure=False) is not _ABSENT
    except MissingMandatoryValue:  # `???`: there, to be set
        return True
