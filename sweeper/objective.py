"""A trial's objective values from what its task returned: a float, a sequence of floats (one per objective,
the Hydra convention `return v0, v1`), a dict of metrics, or the metrics file in the trial's folder."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class ObjectiveError(ValueError):
    """What the task returned is not the sweep's objective(s): that trial's one-line FAIL reason."""


def objective_values(value: Any, n_objectives: int, names: list[str], folder: Path, metrics_file: str) -> list[float]:
    """`names` (hydra.sweeper.objectives) are looked up in a returned dict, else in `<folder>/<metrics_file>`;
    without names the return value itself is the objective(s)."""
    if names:
        if isinstance(value, Mapping) and all(k in value for k in names):
            metrics, where = value, "the returned dict"
        else:
            path = folder / metrics_file
            try:
                metrics, where = json.loads(path.read_text()), str(path)
            except (OSError, ValueError) as e:
                raise ObjectiveError(f"objectives {names}: not in what the task returned and no readable {path} "
                                     f"({type(e).__name__})") from None
        missing = [k for k in names if k not in metrics]
        if missing:
            raise ObjectiveError(f"objectives {missing} missing from {where} (it has {sorted(metrics)[:12]})")
        values = [_number(metrics[k], k) for k in names]
    elif isinstance(value, Mapping):
        if len(value) != n_objectives:
            raise ObjectiveError(f"the task returned a dict of {len(value)} values {sorted(value)[:12]}; name the "
                                 f"objective(s) with hydra.sweeper.objectives=[...]")
        values = [_number(v, k) for k, v in value.items()]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        values = [_number(v, f"value {i}") for i, v in enumerate(value)]
    else:
        values = [_number(value, "the return value")]
    if len(values) != n_objectives:
        raise ObjectiveError(f"the task returned {len(values)} value(s) for {n_objectives} objective(s) "
                             f"(hydra.sweeper.direction has one direction per objective)")
    return values


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool):
        raise ObjectiveError(f"{what} is a bool ({v}), not a number")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ObjectiveError(f"{what} must be a number, got {type(v).__name__} {str(v)[:80]!r}") from None
    if not math.isfinite(f):
        raise ObjectiveError(f"{what} is not finite ({f})")
    return f
