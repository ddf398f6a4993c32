"""Hydra launcher shim for `hydra/launcher=local|slurm`. qlora_exp's sweeper reads these settings and
submits one job per trial itself (asynchronous slots); this class lets Hydra's basic sweeper use the same
settings too, one batch at a time. Implementation: `sweeper.jobs`, imported lazily."""
from typing import Any

from hydra.plugins.launcher import Launcher


class QLoRASubmititLauncher(Launcher):
    def __init__(self, **params: Any) -> None:
        self.params = params

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        from sweeper.jobs import launch_batch

        return launch_batch(self, job_overrides, initial_job_idx)
