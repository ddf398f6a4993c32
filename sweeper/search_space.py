"""Search-space parsing for qlora_exp's Optuna sweeper.

Turns Hydra override-grammar strings (the sweeper's ``params:`` block and command-line
sweep overrides) into Optuna distributions with hydra-optuna-sweeper's mapping
(``create_optuna_distribution_from_override``), so its ``params:`` blocks paste as is:

- ``choice(a, b)`` or ``a,b``        -> CategoricalDistribution([a, b])
- ``shuffle(range(...))``            -> CategoricalDistribution(the range's values)
- ``range(start, stop[, step])``     -> IntDistribution(start, stop, step): stop is
  *included* (unlike Hydra's basic sweeper); FloatDistribution(..., step=step) if any is float
- ``interval(low, high)``            -> FloatDistribution(low, high)
- ``int(interval(low, high))``       -> IntDistribution(low, high)
- ``tag(log, <either interval>)``    -> the same with ``log=True``
- anything else (``5``, ``[1,2]``)   -> a fixed value, kept as its override string
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    Glob,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.errors import OverrideParseException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

_SCALARS = (str, int, float, bool, type(None))
_KEY = "key=value with a non-empty config key such as optimizer.lr"
_CHOICE = "choice(a, b, ...), a,b,... or a YAML list, with at least one str/int/float/bool/null option"
_RANGE = "range(start, stop[, step]) with start < stop and step > 0"
_INTERVAL = "interval(low, high) or int(interval(low, high)) with low < high"
_LOG = "tag(log, interval(low, high)) or tag(log, int(interval(low, high))) with 0 < low < high"
_TAGS = f"{_LOG}; no tag on any other sweep"
_ANY = f"{_CHOICE}; {_RANGE}; {_INTERVAL}; {_LOG}; or a fixed value"


class SearchSpaceError(ValueError):
    """A search-space entry Optuna cannot sample; the message is one line naming the key,
    the value as written and what is accepted."""


def _error(key: str, value: str, problem: str, accepted: str) -> SearchSpaceError:
    message = f"search space: key {key!r}: {value} {problem}; accepted: {accepted}"
    return SearchSpaceError(" ".join(message.splitlines()))


def parse_override(override: Override) -> tuple[str, Any]:
    """Map one parsed override to ``(key, spec)``.

    Accepts an ``Override`` from ``OverridesParser.create().parse_overrides([...])``.
    ``key`` is ``override.get_key_element()`` (``+``/``++``/``~`` prefix kept). ``spec`` is
    an Optuna distribution for a choice / comma list / range / interval sweep (see the
    module docstring), or, for a non-sweep override, the value's override string (``"5"``),
    which stays fixed. Raises SearchSpaceError for what Optuna cannot sample.
    """
    key = override.get_key_element()
    line = override.input_line
    text = line.partition("=")[2] if line else str(override.value())
    if not override.key_or_group.strip():
        raise _error(key, text, "has an empty key", _KEY)
    if not override.is_sweep_override():
        return key, override.get_value_element_as_str()
    value = override.value()
    if isinstance(value, Glob):
        raise _error(key, text, "is a glob, which only Hydra's config loader can expand", _CHOICE)
    if isinstance(value, IntervalSweep):
        return key, _interval(key, text, value)
    if value.tags:
        if isinstance(value, RangeSweep) and "log" in value.tags:
            raise _error(key, text, "is log scale with a step", f"{_LOG}; or {_RANGE}, untagged")
        raise _error(key, text, f"has unknown tag combination {sorted(value.tags)}", _TAGS)
    if isinstance(value, ChoiceSweep):
        return key, _categorical(key, text, override.sweep_iterator(transformer=Transformer.encode))
    if isinstance(value, RangeSweep):
        return key, _range(key, text, override, value)
    raise _error(key, text, "is a sweep Optuna cannot sample", _ANY)


def _categorical(key: str, text: str, options: Iterable[Any]) -> CategoricalDistribution:
    choices = list(options)
    if not choices:
        raise _error(key, text, "has no options", _CHOICE)
    for choice in choices:
        if not isinstance(choice, _SCALARS):
            raise _error(key, text, f"has a {type(choice).__name__} option {choice!r}", _CHOICE)
    return CategoricalDistribution(choices)


def _range(key: str, text: str, override: Override, value: RangeSweep) -> BaseDistribution:
    start, stop, step = value.start, value.stop, value.step
    if step == 0:
        raise _error(key, text, "has step 0", _RANGE)
    if start == stop or (stop - start) * step < 0:
        raise _error(key, text, "is empty (no value from start towards stop)", _RANGE)
    if step < 0:
        raise _error(key, text, "is descending", _RANGE)
    if value.shuffle:  # hydra-optuna-sweeper: Hydra's own (stop-exclusive) values
        return _categorical(key, text, override.sweep_iterator(transformer=Transformer.encode))
    if any(isinstance(x, float) for x in (start, stop, step)):
        # Snap stop onto the grid as Optuna would, minus its warning.
        low, d_step = Decimal(str(start)), Decimal(str(step))
        high = float(low + (Decimal(str(stop)) - low) // d_step * d_step)
        return FloatDistribution(start, high, step=step)
    return IntDistribution(start, stop - (stop - start) % step, step=step)


def _interval(key: str, text: str, value: IntervalSweep) -> BaseDistribution:
    low, high, tags = value.start, value.end, set(value.tags)
    if tags - {"log"}:
        raise _error(key, text, f"has unknown tag combination {sorted(tags)}", _TAGS)
    if low > high:
        raise _error(key, text, "has low > high", _INTERVAL)
    if low == high:  # one point: nothing to search (Optuna would sample it n_trials times)
        raise _error(key, text, "has low == high, a single value", f"{_INTERVAL}; one value is fixed as {key}={low}")
    log = "log" in tags
    if log and low <= 0:
        raise _error(key, text, "is log scale with low <= 0", _LOG)
    if isinstance(low, int) and isinstance(high, int):  # int(interval(...))
        return IntDistribution(low, high, log=log)
    return FloatDistribution(low, high, log=log)


def parse_search_space(
    params: Mapping[str, Any] | None, overrides: Sequence[str]
) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
    """Build ``(distributions, fixed)`` from the ``params:`` block and command-line overrides.

    ``params`` maps config keys to a string in Hydra's override grammar
    (``"tag(log, interval(1e-5, 1e-3))"``, ``"8,16,64"``, ``"5"``), a plain scalar (fixed),
    or a list (a choice among its items); a DictConfig works too. ``overrides`` are
    ``key=value`` strings in the same grammar. They are read in order, params first, and
    the last entry for a key wins, so the command line overrides or extends ``params``.
    Each key ends up in exactly one of the two dicts; fixed values are override strings.
    """
    parser = OverridesParser.create()
    specs: dict[str, Any] = {}
    for raw_key, value in (params or {}).items():
        key = str(raw_key)
        if not key.strip():
            raise _error(key, repr(value), "has an empty key", _KEY)
        if isinstance(value, Sequence) and not isinstance(value, str):
            specs[key] = _categorical(key, str(list(value)), value)
        elif isinstance(value, _SCALARS):
            name, spec = _parse_line(parser, f"{key}={'null' if value is None else value}")
            specs[name] = spec
        else:
            raise _error(key, repr(value), "is not a search-space value", _ANY)
    for line in overrides:
        name, spec = _parse_line(parser, line)
        specs[name] = spec
    distributions = {k: v for k, v in specs.items() if isinstance(v, BaseDistribution)}
    fixed = {k: v for k, v in specs.items() if not isinstance(v, BaseDistribution)}
    return distributions, fixed


def create_params_from_overrides(
    arguments: Sequence[str],
) -> tuple[dict[str, BaseDistribution], dict[str, Any], list[str]]:
    """hydra-optuna-sweeper's ``create_params_from_overrides``, same signature and results:
    ``(distributions, fixed values, delete overrides such as "~z")``; a fixed value is its override string."""
    deletes = [a for a in arguments if a.lstrip().startswith("~")]
    distributions, fixed = parse_search_space(None, [a for a in arguments if a not in deletes])
    return distributions, fixed, deletes


def _parse_line(parser: OverridesParser, line: str) -> tuple[str, Any]:
    try:
        override = parser.parse_overrides([line])[0]
    except OverrideParseException as exc:
        key, _, text = line.partition("=")
        skip = ("See https://", "Error parsing override")
        detail = " ".join(s.strip() for s in str(exc).splitlines() if not s.startswith(skip))
        if "empty choice" in detail:
            raise _error(key, text, "has no options", _CHOICE) from exc
        raise _error(key, text, f"does not parse ({detail})", _ANY) from exc
    return parse_override(override)


def _is_discrete(distribution: BaseDistribution) -> bool:
    if isinstance(distribution, FloatDistribution):
        return distribution.step is not None
    return isinstance(distribution, (CategoricalDistribution, IntDistribution))


def is_grid(distributions: Mapping[str, BaseDistribution]) -> bool:
    """True when every distribution is discrete (Categorical, Int, or Float with a step),
    so a GridSampler can enumerate them; true for an empty search space."""
    return all(_is_discrete(d) for d in distributions.values())


def grid_values(distributions: Mapping[str, BaseDistribution]) -> dict[str, list[Any]]:
    """Every value of each discrete distribution (low..high inclusive, by step), as the
    ``search_space`` of ``optuna.samplers.GridSampler``. Raises SearchSpaceError for a
    continuous distribution."""
    grid: dict[str, list[Any]] = {}
    for key, dist in distributions.items():
        if isinstance(dist, CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution):
            grid[key] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            low, step = Decimal(str(dist.low)), Decimal(str(dist.step))
            count = int((Decimal(str(dist.high)) - low) // step) + 1
            grid[key] = [float(low + i * step) for i in range(count)]
        else:
            accepted = "choice, a,b,..., range(...) or int(interval(...)) for a grid"
            raise _error(key, repr(dist), "is continuous, so a grid cannot enumerate it", accepted)
    return grid
