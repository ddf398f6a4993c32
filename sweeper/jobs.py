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


def make_executor(launcher: DictConfig | None, folder: Path):
    """submitit executor from `hydra.launcher`: `cluster: slurm` -> SLURM, anything else -> local processes."""
    import submitit

    params = dict(launcher or {})
    cluster = params.pop("cluster", "local")
    params.pop("_target_", None)
    params.pop("submitit_folder", None)
    if cluster == "slurm":
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        setup = params.pop("setup", None)
        extra = params.pop("additional_parameters", None) or {}
        kw = {k: v for k, v in params.items() if v is not None and k not in ("gpus", "visible_gpus")}
        slurm_kw = {f"slurm_{k}" if k in ("partition", "qos", "account", "constraint", "array_parallelism", "gres",
                                          "exclude", "signal_delay_s", "max_num_timeout") else k: v
                    for k, v in kw.items()}
        if setup:
            slurm_kw["slurm_setup"] = list(setup)
        if extra:
            slurm_kw["slurm_additional_parameters"] = dict(extra)
        executor.update_parameters(**slurm_kw)
        return executor, "slurm"
    executor = submitit.LocalExecutor(folder=str(folder))
    executor.update_parameters(timeout_min=int(params.get("timeout_min", 24 * 60)))
    return executor, "local"
