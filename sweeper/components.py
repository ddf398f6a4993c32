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
        key = key if key.startswith("hydra.") else f"hydra.sweeper.{key}"
        super().__init__(f"{key}={value!r} is not accepted: {accepted}")


def _kwargs(spec: dict | None, key: str, table: dict) -> tuple[str, dict]:
    spec = dict(spec or {})
    name = str(spec.pop("name", "none" if key == "pruner" else "auto"))
    if name not in table and name != "auto":
        raise SweeperConfigError(f"{key}.name", name, "one of " + ", ".join(sorted(table)))
    return name, spec


def _own_kwargs(kwargs: dict, cls, table: dict) -> dict:
    """`kwargs` less the settings that only other classes of `table` take."""
    own = set(inspect.signature(cls).parameters)
    known = {p for other in table.values() for p in inspect.signature(other).parameters}
    return {k: v for k, v in kwargs.items() if k in own or k not in known}


def build_sampler(spec: dict | None, grid: dict[str, list] | None, multi_objective: bool):
    """`auto`: a grid when every parameter is discrete, NSGA-II for several objectives, else TPE. Like the pruner
    block, settings of another known sampler are dropped (`sampler.name=random` with search=rank_alpha_lr's TPE
    settings still in the block); a setting no sampler knows is an error."""
    name, kwargs = _kwargs(spec, "sampler", SAMPLERS)
    if name == "auto":
        name = "grid" if grid is not None else ("nsgaii" if multi_objective else "tpe")
    kwargs = _own_kwargs(kwargs, SAMPLERS[name], SAMPLERS)
    if name == "grid":
        if grid is None:
            raise SweeperConfigError("sampler.name", "grid", "tpe, random, ... : a grid needs every parameter "
                                     "discrete (choice, range, int interval, comma list)")
        kwargs = {k: v for k, v in kwargs.items() if k == "seed"}
    try:
        return name, SAMPLERS[name](grid, **kwargs) if name == "grid" else SAMPLERS[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise SweeperConfigError("sampler", spec, f"arguments of optuna.samplers.{SAMPLERS[name].__name__} ({e})") from None


def build_pruner(spec: dict | None):
    """`{name: hyperband}` works with the median defaults still in the block: settings that belong to
    another known pruner are dropped; a setting no pruner knows is an error."""
    name, kwargs = _kwargs(spec, "pruner", PRUNERS)
    kwargs = _own_kwargs(kwargs, PRUNERS[name], PRUNERS)
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
        check_journal(path, url)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return _rdb_with_retry(lambda: RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}))
    if "://" not in url:
        raise SweeperConfigError("storage", url, "sqlite:///path.db, journal:///path.log or a database URL")
    return _rdb_with_retry(lambda: RDBStorage(url))


def _rdb_with_retry(make, attempts: int = 5):
    """Drivers started together on a new database race to create its tables ("table ... already
    exists"); the loser retries once the winner is done."""
    import time

    from sqlalchemy.exc import IntegrityError, OperationalError

    for i in range(attempts):
        try:
            return make()
        except (OperationalError, IntegrityError) as e:
            if i == attempts - 1 or not any(m in str(e) for m in ("already exists", "UNIQUE constraint", "locked")):
                raise
            time.sleep(0.5 * (i + 1))


def check_journal(path: Path, url: str) -> None:
    """Refuse a journal with a line that is not a whole record (a torn write, garbage): Optuna skips a bad
    last line when reading, but the next record appended after it makes every reader fail, the whole study
    with them. Read under the journal's own lock, so a record being appended is never half-seen."""
    import json

    from optuna.storages.journal import JournalFileOpenLock

    if not path.is_file() or path.stat().st_size == 0:
        return
    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    try:
        with open(path, "rb") as f:
            offset, bad = 0, None
            for number, line in enumerate(f, 1):
                if bad is None:
                    try:
                        if not line.endswith(b"\n"):
                            raise ValueError("no end of line: a torn write")
                        if not isinstance(json.loads(line.decode("utf-8")), dict):
                            raise ValueError("not a JSON object")
                    except ValueError as e:  # JSON and UTF-8 errors too
                        bad = (number, offset, " ".join(str(e).split())[:80], 0)
                        continue
                    offset += len(line)
                else:
                    bad = (*bad[:3], bad[3] + 1)
    finally:
        lock.release()
    if bad is not None:
        number, offset, why, after = bad
        raise SweeperConfigError("storage", url, f"an Optuna journal whose every line is a whole record: line {number} "
                                 f"(byte {offset}) is not ({why}); the {number - 1} records before it are intact"
                                 f"{f' ({after} more lines follow it)' if after else ''}: keep them with "
                                 f"truncate -s {offset} {path} (or move the file aside)")


def storage_error(url: str, e: BaseException) -> SweeperConfigError:
    """What went wrong opening a storage, as one line: the URL (password hidden) and the driver's reason."""
    while e.__cause__ is not None:  # Optuna's StorageInternalError says less than the database error under it
        e = e.__cause__
    reason = " ".join(str(getattr(e, "orig", None) or e).split())[:300]
    return SweeperConfigError("storage", hide_password(url),
                              f"a storage this process can open and write ({type(e).__name__}: {reason})")


STORAGE_ENV = "QLORA_EXP_STUDY_STORAGE"


def hide_password(url: str | None) -> str | None:
    """The storage URL as logs, result files and trial configs may show it: a database password as ***."""
    if not url or "@" not in url or url.startswith(("sqlite:", "journal:")):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        import re

        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def storage_from_file(url: str) -> str:
    """A storage URL read back from a sweep's files: a hidden password comes from the environment (STORAGE_ENV)."""
    import os

    if "***@" not in url:
        return url
    full = os.environ.get(STORAGE_ENV)
    if full and hide_password(full) == url:
        return full
    raise SweeperConfigError("storage", url, f"the full URL in the environment variable {STORAGE_ENV} "
                             "(a database password is never written to the sweep's files)")


def storage_for_trials(url: str) -> str | None:
    """What trial processes are told of the study's storage in their overrides (which Hydra and the trial write
    to their folders): the URL itself, or None when it holds a password; then the trials read it from the
    environment they inherit from the driver (STORAGE_ENV; SLURM jobs get it through sbatch's --export=ALL)."""
    import os

    if hide_password(url) == url:
        return url
    os.environ[STORAGE_ENV] = url
    return None


def range_edges(trial, within: float = 0.02) -> dict[str, str]:
    """The parameters of `trial` (the best one) that sit at an end of their range: within `within` of the range
    (on the log scale for log ranges), or the smallest/largest of three or more numeric choices. The optimum may lie
    past that end; a wider range is worth a try."""
    import math

    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    edges = {}
    for name, dist in trial.distributions.items():
        value = trial.params[name]
        if isinstance(dist, (FloatDistribution, IntDistribution)):
            f = math.log if dist.log else float
            span = f(dist.high) - f(dist.low)
            where = (f(value) - f(dist.low)) / span if span else 0.5
            lo_hi = (f"{dist.low:g}", f"{dist.high:g}")
        elif isinstance(dist, CategoricalDistribution) and len(dist.choices) >= 3 and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) for c in dist.choices):
            ordered = sorted(dist.choices)
            where = 0.0 if value == ordered[0] else 1.0 if value == ordered[-1] else 0.5
            lo_hi = (f"{ordered[0]:g}", f"{ordered[-1]:g}")
        else:
            continue
        if where <= within or where >= 1 - within:
            end = "bottom" if where <= within else "top"
            edges[name] = f"{value:g} is at the {end} of {lo_hi[0]}..{lo_hi[1]}: the best value may lie past it"
    return edges
