"""Hydra finds sweepers only under `hydra_plugins`; this thin class imports the real one lazily
(no optuna or torch at Hydra start-up). The implementation is `sweeper.optuna_sweeper`."""
from typing import Any

from hydra.plugins.sweeper import Sweeper


class QLoRAOptunaSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        from sweeper.errors import SweeperConfigError
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

        from sweeper.errors import SweeperConfigError
        from sweeper.loop import SweepInterrupted, SweepStopped
        from sweeper.search_space import SearchSpaceError

        full = os.environ.get("HYDRA_FULL_ERROR") == "1"
        try:
            if self.error is not None:
                raise self.error
            return self.sweeper.sweep(arguments)
        except (SweeperConfigError, SearchSpaceError) as e:  # bad settings: one line, exit 2, nothing stored
            if full:
                raise
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except SweepStopped as e:  # too many failures, a scheduler refusing jobs: one line, the study kept
            if full:
                raise
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        except SweepInterrupted:  # the loop said so in one line per signal, and queued what it cut short
            raise SystemExit(130) from None
        except KeyboardInterrupt:  # before any trial started
            if full:
                raise
            print("error: sweep interrupted before its first trial started; nothing was run", file=sys.stderr)
            raise SystemExit(130) from None
