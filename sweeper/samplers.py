"""Samplers and pruners from the sweeper's config blocks, in either form:

- a config group with `_target_` (hydra-optuna-sweeper's and lightning-hydra-template's form):
  `hydra/sweeper/sampler=tpe`, `hydra/sweeper/pruner=hyperband`, or any class `_target_: my.module.Sampler`;
- the short form `name:` (`hydra.sweeper.sampler.name=random`), which wins over a `_target_` in the same block.

Settings that belong to another known sampler or pruner are dropped (`hydra/sweeper/sampler=random` with
search=rank_alpha_lr's TPE settings still in the block); a setting no known class takes is an error.
"""
from __future__ import annotations

import hashlib
import inspect
from typing import Any

import optuna

from sweeper.errors import SweeperConfigError

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
    "wilcoxon": optuna.pruners.WilcoxonPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}
MOTPE = ("The 'motpe' sampler was removed in Optuna 4.0. Use 'hydra/sweeper/sampler=tpe' instead. "
         "TPESampler now handles multi-objective optimization.")


def motpe_removed(*args: Any, **kwargs: Any):
    """`_target_` of hydra/sweeper/sampler=motpe: hydra-optuna-sweeper's hint, as it gives it."""
    raise ValueError(MOTPE)


def derived_seed(study_name: str) -> int:
    """A sampler seed of null: one derived from the study's name, so the same command suggests the same trials."""
    return int(hashlib.sha1(study_name.encode()).hexdigest()[:8], 16)


# samplers whose drivers must share one seed: a grid's order, and QMC's scrambled sequence that the trials' numbers
# index (each driver of a QMC study takes the next points of one sequence)
SHARED_SEED = ("grid", "qmc")


def driver_seed(seed: int, study_name: str, driver: str | None) -> int:
    """The seed of one driver's sampler: the study's seed for its first driver (the same command suggests the same
    trials), one derived from the study and the driver's id for every later or parallel driver (four drivers of one
    random or TPE search explore four ways, and a resumed random search does not suggest its first points again)."""
    return seed if driver is None else derived_seed(f"{study_name}/{seed}/{driver}")


def _resolve(spec: dict | None, key: str, table: dict, default: str) -> tuple[str, type | None, dict]:
    """(name, class, kwargs) of a block; name "auto" has no class yet."""
    from hydra.utils import get_class

    kwargs = {k: v for k, v in (spec or {}).items() if k not in ("_target_", "_partial_", "name")}
    name, target = (spec or {}).get("name"), (spec or {}).get("_target_")
    if name == "motpe" or str(target).endswith("motpe_removed"):
        raise SweeperConfigError(key, "motpe", MOTPE)
    if name is None and target is None:
        name = default
    if name is not None:
        name = str(name)
        if name == "auto":
            return name, None, kwargs
        if name not in table:
            raise SweeperConfigError(f"{key}.name", name, f"one of auto, {', '.join(sorted(table))} "
                                     f"(or hydra/sweeper/{key}=<name>)")
        return name, table[name], kwargs
    try:
        cls = get_class(str(target))
    except Exception as e:  # noqa: BLE001  (hydra's ImportError/ValueError alike)
        raise SweeperConfigError(f"{key}._target_", target, f"an importable class ({' '.join(str(e).split())[:200]})"
                                 ) from None
    known = {v: k for k, v in table.items()}
    return known.get(cls, cls.__qualname__), cls, kwargs


def _own_kwargs(kwargs: dict, cls, table: dict) -> dict:
    """`kwargs` less the settings that only other classes of `table` take (none dropped for a class not in it)."""
    if cls not in table.values():
        return kwargs
    own = set(inspect.signature(cls).parameters)
    known = {p for other in table.values() for p in inspect.signature(other).parameters}
    return {k: v for k, v in kwargs.items() if k in own or k not in known}


def _make(cls, args: tuple, kwargs: dict, key: str, spec):
    from hydra.utils import instantiate

    try:  # instantiate: nested `_target_` blocks (e.g. independent_sampler) become objects too
        factory = instantiate({"_target_": f"{cls.__module__}.{cls.__qualname__}", **kwargs}, _partial_=True)
        return factory(*args)
    except Exception as e:  # noqa: BLE001  (TypeError/ValueError from the class, InstantiationException around them)
        while e.__cause__ is not None:
            e = e.__cause__
        raise SweeperConfigError(key, spec, f"arguments of {cls.__module__.split('._')[0]}.{cls.__qualname__} "
                                 f"({' '.join(str(e).split())[:300]})") from None


def build_sampler(spec: dict | None, grid: dict[str, list] | None, multi_objective: bool, study_name: str = "",
                  driver: str | None = None):
    """(name, sampler). `auto`: a grid when every parameter is discrete, NSGA-II for several objectives, else TPE.
    A null seed is derived from the study's name; `driver` (not the study's first) gets a seed of its own."""
    name, cls, kwargs = _resolve(spec, "sampler", SAMPLERS, "auto")
    if cls is None:
        name = "grid" if grid is not None else ("nsgaii" if multi_objective else "tpe")
        cls = SAMPLERS[name]
    kwargs = _own_kwargs(kwargs, cls, SAMPLERS)
    if kwargs.get("seed", None) is None and "seed" in inspect.signature(cls).parameters:
        kwargs["seed"] = derived_seed(study_name)
    if kwargs.get("seed") is not None and name not in SHARED_SEED:
        kwargs["seed"] = driver_seed(int(kwargs["seed"]), study_name, driver)
    if cls is optuna.samplers.GridSampler:
        if grid is None:
            raise SweeperConfigError("sampler", name, "tpe, random, ... : a grid needs every parameter "
                                     "discrete (choice, range, int interval, comma list)")
        return name, _make(cls, (grid,), {k: v for k, v in kwargs.items() if k == "seed"}, "sampler", spec)
    return name, _make(cls, (), kwargs, "sampler", spec)


def build_pruner(spec: dict | None, grid: bool = False):
    """(name, pruner, spec for the trials). `auto`: the median pruner for a search, none for a grid (a grid the
    user asked for runs every point to its end, unless they ask for a pruner)."""
    name, cls, kwargs = _resolve(spec, "pruner", PRUNERS, "none")
    if cls is None:
        name = "none" if grid else "median"
        cls = PRUNERS[name]
    kwargs = _own_kwargs(kwargs, cls, PRUNERS)
    pruner = _make(cls, (), kwargs, "pruner", spec)
    trial_spec = {"name": name, **kwargs} if name in PRUNERS else {"_target_": f"{cls.__module__}.{cls.__qualname__}",
                                                                    **kwargs}
    return name, pruner, trial_spec
