"""The sweeper's one error type: a setting that cannot work, said in one line before anything runs."""
from __future__ import annotations

from typing import Any


class SweeperConfigError(ValueError):
    """A sweeper setting that cannot work; one line naming the key, the value and what is accepted."""

    def __init__(self, key: str, value: Any, accepted: str, sweeper_key: bool = True):
        key = key if key.startswith("hydra.") or not sweeper_key else f"hydra.sweeper.{key}"
        super().__init__(" ".join(f"{key}={value!r} is not accepted: {accepted}".split()))
