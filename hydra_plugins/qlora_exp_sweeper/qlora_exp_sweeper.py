"""Hydra finds sweepers only under `hydra_plugins`; this thin class imports the real one lazily
(no optuna or torch at Hydra start-up). The implementation is `sweeper.optuna_sweeper`."""
from typing import Any

from hydra.plugins.sweeper import Sweeper


class QLoRAOptunaSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        from sweeper.components import SweeperConfigError
        from sweeper.optuna_sweeper import OptunaSweeperImpl

        self.error = None
        try:
            self.sweeper = OptunaSweeperImpl(**kwargs)
        except SweeperConfigError as e:  # Hydra would wrap it in a multi-line message: report it from sweep()
            self.error = e

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        if self.error is None:
            self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        import os
        import sys

        from sweeper.components import SweeperConfigError
        from sweeper.search_space import SearchSpaceError

        try:
            if self.error is not None:
                raise self.error
            return self.sweeper.sweep(arguments)
        except (SweeperConfigError, SearchSpaceError) as e:  # bad settings: one line, exit 2, nothing stored
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (scancel): the sweeper has cancelled its trials
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print("error: sweep interrupted: the trials it was running are FAIL, each queued for one retry; "
                  "rerun the same command to resume", file=sys.stderr)
            raise SystemExit(130) from None
