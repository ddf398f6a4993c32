"""Hydra finds sweepers only under `hydra_plugins`; this thin class imports the real one lazily
(no optuna or torch at Hydra start-up). The implementation is `sweeper.optuna_sweeper`."""
from typing import Any

from hydra.plugins.sweeper import Sweeper


class QLoRAOptunaSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        from sweeper.optuna_sweeper import OptunaSweeperImpl

        self.sweeper = OptunaSweeperImpl(**kwargs)

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)
