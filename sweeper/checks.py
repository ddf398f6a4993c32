"""Every value of a sweep checked before its first trial starts: each choice and grid point, both ends of an
interval, composed as a trial's config is (Hydra refuses unknown keys and wrong types) and passed to the app's
own single-run check (`hydra.sweeper.check`, e.g. qlora_exp.validate.check_trial). One line, exit 2."""
from __future__ import annotations

import itertools
import logging
import math
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from sweeper.errors import SweeperConfigError
from sweeper.naming import hydra_value

log = logging.getLogger("qlora_exp.sweeper")
ALL_POINTS_UP_TO = 64  # a grid this small is checked point by point; a bigger one value by value


def sweep_points(distributions: dict[str, BaseDistribution], grid: dict[str, list] | None) -> list[dict[str, Any]]:
    """The parameter sets to check: a small grid whole; otherwise every value (each choice, the ends of a range) of
    each parameter, the others at their first value."""
    if grid is not None and math.prod(map(len, grid.values())) <= ALL_POINTS_UP_TO:
        return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    ends = {k: _ends(d) for k, d in distributions.items()}
    base = {k: v[0] for k, v in ends.items()}
    points = [base] + [{**base, k: v} for k, values in ends.items() for v in values[1:]]
    return points


def _ends(d: BaseDistribution) -> list[Any]:
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, (FloatDistribution, IntDistribution)):
        return [d.low, d.high] if d.low != d.high else [d.low]
    return []


def check_sweep(hydra_context, config, fixed: list[str], extra: list[str], points: list[dict], check: str | None):
    """Compose each point's trial config and run `check` (a dotted callable taking the config) on it; the first
    refusal raises SweeperConfigError naming the value, before any trial starts and before anything is stored."""
    from hydra.errors import HydraException
    from hydra.utils import get_method
    from omegaconf.errors import OmegaConfBaseException

    from sweeper.compose import composer

    checker = get_method(check) if check else None
    compose = composer(hydra_context.config_loader, config)
    seen: set[str] = set()
    for point in points:
        overrides = [f"{k}={hydra_value(v)}" for k, v in point.items()]
        try:
            cfg = compose([*fixed, *overrides, *extra])
            if checker is not None:
                checker(cfg)
        except (HydraException, OmegaConfBaseException, ValueError, TypeError) as e:
            raise _refusal(e, point) from None
        seen.update(overrides)
    log.info("checked %d value(s) of the sweep in %d config(s) before starting it", len(seen), len(points))


def _refusal(e: BaseException, point: dict) -> SweeperConfigError:
    """The check's own one line when it names a key (qlora_exp's ConfigError), else Hydra's first line."""
    key = getattr(e, "key", None)
    if key is not None and hasattr(e, "accepted"):
        value = getattr(e, "value", point.get(key))
        return SweeperConfigError(key, value, f"{e.accepted} (a value of this sweep, checked before any trial "
                                  "starts)", sweeper_key=False)
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    swept = " ".join(f"{k}={hydra_value(v)}" for k, v in point.items())
    return SweeperConfigError("params", swept, f"a trial config Hydra can compose ({lines[0][:300] if lines else e})")
