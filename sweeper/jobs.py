"""A trial as a submitit job: compose the trial's config in the job's process and run Hydra's task.

The same callable runs as a local process (submitit's LocalExecutor) or a SLURM job (SlurmExecutor),
like hydra-submitit-launcher's, but one trial per job so the sweeper can keep every slot busy.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, run_job, setup_globals
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class TrialJob:
    def __init__(self, hydra_context: Any, task_function: Any, config: DictConfig):
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def __call__(self, overrides: list[str], job_num: int, singleton_state: dict) -> JobReturn:
        import submitit

        Singleton.set_state(singleton_state)
        setup_globals()
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.id = submitit.JobEnvironment().job_id
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


SWEEPER_KEYS = ("_target_", "cluster", "submitit_folder", "trial_overrides", "study_storage")
SLURM_ONLY = ("partition", "qos", "account", "constraint", "gres", "exclude", "array_parallelism", "signal_delay_s",
              "setup", "additional_parameters", "comment")


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_thread_exports(cpus_per_task, setup) -> list[str]:
    """sbatch script lines giving a trial's OpenMP/MKL as many threads as the CPUs SLURM gave its job
    (`cpus_per_task`), unless the user's own setup lines set them. Without them torch starts one thread per core of
    the node, and trials sharing a node spin against each other (10x slower trials seen on 2 cores)."""
    if not cpus_per_task:
        return []
    return [f"export {var}={int(cpus_per_task)}" for var in THREAD_VARS
            if not any(f"{var}=" in line for line in setup or [])]


def make_executor(launcher: DictConfig | None, folder: Path):
    """A submitit executor from `hydra.launcher` (conf/hydra/launcher/): `cluster: slurm` -> SLURM jobs,
    anything else (Hydra's own basic launcher included) -> local processes."""
    import submitit
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(launcher, resolve=True) if launcher is not None else {}
    cluster = params.get("cluster", "local")
    folder = Path(params.get("submitit_folder") or folder)
    params = {k: v for k, v in params.items() if k not in SWEEPER_KEYS and v not in (None, [], {})}
    if cluster == "slurm":
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm",
                                         slurm_max_num_timeout=int(params.pop("max_num_timeout", 3)))
        params["setup"] = [*cpu_thread_exports(params.get("cpus_per_task"), params.get("setup")),
                           *(params.get("setup") or [])]
        executor.update_parameters(**{f"slurm_{k}" if k in SLURM_ONLY else k: v for k, v in params.items()})
        return executor, "slurm"
    executor = submitit.LocalExecutor(folder=str(folder))
    executor.update_parameters(timeout_min=int(params.get("timeout_min", 24 * 60)))
    return executor, "local"


def launch_batch(launcher, job_overrides, initial_job_idx: int) -> list[JobReturn]:
    """Hydra's Launcher.launch for the basic sweeper: submit the batch, wait for all of it."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log

    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    executor, _ = make_executor(config.hydra.launcher, sweep_dir / ".submitit")
    job = TrialJob(launcher.hydra_context, launcher.task_function, config)
    extra = list(config.hydra.launcher.get("trial_overrides") or [])
    jobs = [executor.submit(job, [*overrides, *extra], initial_job_idx + i, Singleton.get_state())
            for i, overrides in enumerate(job_overrides)]
    return [job_result(j) for j in jobs]
