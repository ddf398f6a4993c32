"""Samplers, pruners and storages from small config dicts: `{name: tpe, seed: 0, ...kwargs}`."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import optuna

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
    "nsgaii": optuna.samplers.NSGAIISampler,
    "qmc": optuna.samplers.QMCSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}


class SweeperConfigError(ValueError):
    """A sweeper setting that cannot work; one line naming the key, the value and what is accepted."""

    def __init__(self, key: str, value: Any, accepted: str):
        super().__init__(f"hydra.sweeper.{key}={value!r} is not accepted: {accepted}")


def _kwargs(spec: dict | None, key: str, table: dict) -> tuple[str, dict]:
    spec = dict(spec or {})
    name = str(spec.pop("name", "none" if key == "pruner" else "auto"))
    if name not in table and name != "auto":
        raise SweeperConfigError(f"{key}.name", name, "one of " + ", ".join(sorted(table)))
    return name, spec


def build_sampler(spec: dict | None, grid: dict[str, list] | None, multi_objective: bool):
    """`auto`: a grid when every parameter is discrete, NSGA-II for several objectives, else TPE."""
    name, kwargs = _kwargs(spec, "sampler", SAMPLERS)
    if name == "auto":
        name = "grid" if grid is not None else ("nsgaii" if multi_objective else "tpe")
    if name == "grid":
        if grid is None:
            raise SweeperConfigError("sampler.name", "grid", "tpe, random, ... : a grid needs every parameter "
                                     "discrete (choice, range, int interval, comma list)")
        kwargs = {k: v for k, v in kwargs.items() if k == "seed"}
        return name, SAMPLERS[name](grid, **kwargs)
    try:
        return name, SAMPLERS[name](**kwargs)
    except TypeError as e:
        raise SweeperConfigError("sampler", spec, f"arguments of optuna.samplers.{SAMPLERS[name].__name__} ({e})") from None


def build_pruner(spec: dict | None):
    """`{name: hyperband}` works with the median defaults still in the block: settings that belong to
    another known pruner are dropped; a setting no pruner knows is an error."""
    name, kwargs = _kwargs(spec, "pruner", PRUNERS)
    own = set(inspect.signature(PRUNERS[name]).parameters)
    known = {p for cls in PRUNERS.values() for p in inspect.signature(cls).parameters}
    for key in list(kwargs):
        if key not in own and key in known:
            kwargs.pop(key)
    try:
        return PRUNERS[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise SweeperConfigError("pruner", spec, f"arguments of optuna.pruners.{PRUNERS[name].__name__} ({e})") from None


def build_storage(url: str):
    """`sqlite:///...` or any database URL -> RDBStorage; `journal:///path.log` -> JournalStorage (NFS-safe lock)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url.startswith("journal://"):
        path = Path(url[len("journal://"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    if "://" not in url:
        raise SweeperConfigError("storage", url, "sqlite:///path.db, journal:///path.log or a database URL")
    return RDBStorage(url)
