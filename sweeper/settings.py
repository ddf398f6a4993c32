"""The sweeper's settings (hydra.sweeper.*), read and checked once: a bad one is one line before anything runs."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sweeper import bytecode
from sweeper.errors import SweeperConfigError

MODES = {"workers": "n_jobs long-lived processes that pull trial after trial and keep what trials share loaded",
         "processes": "one new process or SLURM job per trial"}
MIGRATED = {  # hydra-optuna-sweeper keys that are spelled differently here
    "search_space": "params (hydra-optuna-sweeper deprecated search_space in 1.2 and removed it: write the space in "
                    "params, e.g. x: interval(0, 1))",
}


@dataclass
class Settings:
    sampler: dict | None = None
    pruner: dict | None = None
    direction: Any = "minimize"
    objectives: list[str] = field(default_factory=list)
    metrics_file: str = "metrics.json"
    study_name: str | None = None
    storage: str | None = None
    study_dir: str = "outputs/multirun"
    n_trials: int | None = None
    timeout: float | None = None
    n_jobs: int = 1
    mode: str = "workers"
    wait_for_workers: bool = True
    slots_per_gpu: Any = None
    memory_estimate: str | None = None
    max_failure_rate: float = 0.5
    params: dict | None = None
    custom_search_space: str | None = None
    check: str | None = None
    gpus: list[int] | None = None
    heartbeat_s: float = 10.0
    stale_after_s: float = 120.0
    prune_metric: str = "eval_loss"
    callbacks_key: str | None = "callbacks"
    run_name_key: str | None = "run_name"
    command: str | None = None
    poll_s: float = 0.2
    pending_note_s: float = 60.0
    bytecode_cache: Any = "auto"

    @property
    def directions(self) -> list[str]:
        d = self.direction
        return [str(x) for x in d] if isinstance(d, (list, tuple)) else [str(d)] * max(1, len(self.objectives))

    @classmethod
    def from_config(cls, **kwargs: Any) -> Settings:
        known = {f.name for f in fields(cls)}
        for key, value in kwargs.items():
            if key in MIGRATED:
                raise SweeperConfigError(key, _py(value), f"not a setting here; use {MIGRATED[key]}")
            if key not in known:
                raise SweeperConfigError(key, _py(value), "a sweeper setting: " + ", ".join(sorted(known)))
        s = cls(**{k: _py(v) for k, v in kwargs.items()})
        s.objectives = list(s.objectives or [])
        s.check_values()
        s.storage, s.study_dir = absolute_url(s.storage), str(Path(s.study_dir).absolute())
        return s

    def check_values(self) -> None:
        s = self
        s.n_jobs = _integer("n_jobs", s.n_jobs, 1, "an integer >= 1")
        if s.mode not in MODES:
            raise SweeperConfigError("mode", s.mode, " or ".join(f"{k} ({v})" for k, v in MODES.items()))
        if not isinstance(s.wait_for_workers, bool):
            raise SweeperConfigError("wait_for_workers", s.wait_for_workers, "true or false")
        if s.slots_per_gpu not in (None, "auto"):
            s.slots_per_gpu = _integer("slots_per_gpu", s.slots_per_gpu, 1, "an integer >= 1, auto (from the trial's "
                                       "memory estimate and the GPU's memory) or null (n_jobs spread over the GPUs)")
        if s.n_trials is not None:
            s.n_trials = _integer("n_trials", s.n_trials, 1, "an integer >= 1, or null (the grid's size or 20)")
        if s.timeout is not None and (isinstance(s.timeout, bool) or not isinstance(s.timeout, (int, float))
                                      or not 0 < s.timeout < float("inf")):
            raise SweeperConfigError("timeout", s.timeout, "a number of seconds > 0, or null (no time limit)")
        try:
            s.max_failure_rate = float(s.max_failure_rate)
        except (TypeError, ValueError):
            raise SweeperConfigError("max_failure_rate", s.max_failure_rate, "a number from 0 to 1") from None
        if not 0 <= s.max_failure_rate <= 1:  # NaN fails this too
            raise SweeperConfigError("max_failure_rate", s.max_failure_rate, "a number from 0 to 1")
        for d in s.directions:
            if d.lower() not in ("minimize", "maximize"):
                raise SweeperConfigError("direction", d, "minimize or maximize (or a list, one per objective)")
        if s.objectives and len(s.directions) != len(s.objectives):
            raise SweeperConfigError("direction", s.direction, f"one direction per objective {s.objectives}")
        if s.storage is not None and not isinstance(s.storage, str):
            raise SweeperConfigError("storage", s.storage, "sqlite:///path.db, journal:///path.log, a database URL "
                                     "or null (an in-memory study)")
        for key in ("heartbeat_s", "stale_after_s", "poll_s", "pending_note_s"):
            value = getattr(s, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise SweeperConfigError(key, value, "a number of seconds > 0")
        if s.bytecode_cache is not False and s.bytecode_cache is not None and (
                not isinstance(s.bytecode_cache, str) or not s.bytecode_cache.strip()):
            raise SweeperConfigError("bytecode_cache", s.bytecode_cache, bytecode.ACCEPTED)
        for key in ("sampler", "pruner"):
            if getattr(s, key) is not None and not isinstance(getattr(s, key), dict):
                raise SweeperConfigError(key, getattr(s, key), f"a block such as hydra/sweeper/{key}=<name> selects, "
                                         f"or {{name: <name>, ...}}")


def absolute_url(url: str | None) -> str | None:
    """A relative SQLite or journal path made absolute from where the sweep starts: trial processes and SLURM jobs
    then find the same study wherever they run."""
    for scheme in ("sqlite:///", "journal://"):
        if url and url.startswith(scheme) and not url[len(scheme):].startswith("/") and url[len(scheme):] != ":memory:":
            return scheme + str(Path(url[len(scheme):]).absolute())
    return url


def _py(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


def _integer(key: str, value: Any, low: int, accepted: str) -> int:
    if isinstance(value, bool):
        raise SweeperConfigError(key, value, accepted)
    if not isinstance(value, int):
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise SweeperConfigError(key, value, accepted) from None
        if not as_float.is_integer():
            raise SweeperConfigError(key, value, accepted)
        value = int(as_float)
    if value < low:
        raise SweeperConfigError(key, value, accepted)
    return value
