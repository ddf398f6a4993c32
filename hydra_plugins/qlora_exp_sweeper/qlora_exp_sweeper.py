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
        import os
        import sys

        from sweeper.components import SweeperConfigError
        from sweeper.search_space import SearchSpaceError

        try:
            return self.sweeper.sweep(arguments)
        except (SweeperConfigError, SearchSpaceError) as e:  # bad settings: one line, exit 2, nothing stored
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
