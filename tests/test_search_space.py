"""Tests for sweeper.search_space (Hydra override grammar -> Optuna distributions)."""

from typing import Any

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from sweeper.search_space import (
    SearchSpaceError,
    grid_values,
    is_grid,
    parse_override,
    parse_search_space,
)

# Optuna < 3 classes used by hydra-optuna-sweeper, and what they became:
# UniformDistribution(a, b)          -> FloatDistribution(a, b)
# LogUniformDistribution(a, b)       -> FloatDistribution(a, b, log=True)
# IntUniformDistribution(a, b)       -> IntDistribution(a, b)
# IntLogUniformDistribution(a, b)    -> IntDistribution(a, b, log=True)
# DiscreteUniformDistribution(a,b,q) -> FloatDistribution(a, b, step=q)


def check_distribution(expected: BaseDistribution, actual: Any) -> None:
    """As upstream: categorical choices compare as sets (shuffle() randomizes order)."""
    if not isinstance(expected, CategoricalDistribution):
        assert expected == actual
        return
    assert isinstance(actual, CategoricalDistribution)
    assert set(expected.choices) == set(actual.choices)


def parse_one(line: str) -> tuple[str, Any]:
    return parse_override(OverridesParser.create().parse_overrides([line])[0])


# hydra-optuna-sweeper's own cases of the override -> distribution mapping: tests/peer/test_optuna_sweeper.py


@pytest.mark.filterwarnings("error")  # stop is snapped onto the grid without Optuna's warning
@pytest.mark.parametrize(
    "line, expected",
    [
        ("lora.r=8,16,64", CategoricalDistribution([8, 16, 64])),
        ("opt=choice(adamw, sgd)", CategoricalDistribution(["adamw", "sgd"])),
        ("opt=choice('a,b', c)", CategoricalDistribution(["a,b", "c"])),
        ("mods=choice([q,v],[q,k,v])", CategoricalDistribution(["[q,v]", "[q,k,v]"])),
        ("key=range(1,5)", IntDistribution(1, 5)),
        ("key=range(5)", IntDistribution(0, 5)),
        ("key=range(1,10,2)", IntDistribution(1, 9, step=2)),
        ("key=range(0,1,0.3)", FloatDistribution(0, 0.9, step=0.3)),
        ("key=float(range(1,3))", FloatDistribution(1, 3, step=1)),
        ("key=interval(0,1)", FloatDistribution(0, 1)),
        ("key=tag(log, interval(1e-5,1e-3))", FloatDistribution(1e-5, 1e-3, log=True)),
    ],
)
def test_more_sweeps(line: str, expected: BaseDistribution) -> None:
    check_distribution(expected, parse_one(line)[1])


@pytest.mark.parametrize(
    "line, key, fixed",
    [
        ("key=5", "key", "5"),
        ("key=0.001", "key", "0.001"),
        ("key=adamw", "key", "adamw"),
        ("key=[1,2]", "key", "[1,2]"),
        ("key=null", "key", "null"),
        ("+new.key=3", "+new.key", "3"),
    ],
)
def test_non_sweep_override_is_fixed(line: str, key: str, fixed: str) -> None:
    assert parse_one(line) == (key, fixed)


# Every case of hydra-optuna-sweeper's test_create_params_from_overrides.
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["key=choice(1,2)"], ({"key": CategoricalDistribution([1, 2])}, {})),
        (["key=5"], ({}, {"key": "5"})),
        (
            ["key1=choice(1,2)", "key2=5"],
            ({"key1": CategoricalDistribution([1, 2])}, {"key2": "5"}),
        ),
        (
            ["key1=choice(1,2)", "key2=5", "key3=range(1,3)"],
            (
                {"key1": CategoricalDistribution([1, 2]), "key3": IntDistribution(1, 3)},
                {"key2": "5"},
            ),
        ),
    ],
)
def test_create_params_from_overrides(overrides: list[str], expected: Any) -> None:
    assert parse_search_space(None, overrides) == expected


PARAMS = {
    "optimizer.lr": "tag(log, interval(1e-5, 1e-3))",
    "lora.r": "8,16,64",
    "lora.alpha": [16, 32],
    "lora.dropout": "interval(0.0, 0.1)",
    "train.epochs": 3,
    "train.bf16": True,
    "data.max_len": "512",
}


def test_params_block_alone() -> None:
    distributions, fixed = parse_search_space(PARAMS, [])
    assert distributions == {
        "optimizer.lr": FloatDistribution(1e-5, 1e-3, log=True),
        "lora.r": CategoricalDistribution([8, 16, 64]),
        "lora.alpha": CategoricalDistribution([16, 32]),
        "lora.dropout": FloatDistribution(0.0, 0.1),
    }
    assert fixed == {"train.epochs": "3", "train.bf16": "True", "data.max_len": "512"}


def test_command_line_overrides_and_extends_params() -> None:
    overrides = [
        "lora.r=32",  # sweep in params -> fixed
        "train.epochs=1,2",  # fixed in params -> sweep
        "optimizer.lr=interval(1e-4, 2e-4)",  # sweep -> other sweep
        "+lora.use_rslora=choice(true, false)",  # new key
        "seed=7",  # new fixed key
    ]
    distributions, fixed = parse_search_space(PARAMS, overrides)
    assert distributions == {
        "optimizer.lr": FloatDistribution(1e-4, 2e-4),
        "lora.alpha": CategoricalDistribution([16, 32]),
        "lora.dropout": FloatDistribution(0.0, 0.1),
        "train.epochs": CategoricalDistribution([1, 2]),
        "+lora.use_rslora": CategoricalDistribution([True, False]),
    }
    assert fixed == {"lora.r": "32", "train.bf16": "True", "data.max_len": "512", "seed": "7"}
    assert not distributions.keys() & fixed.keys()


def test_params_as_dictconfig_and_none() -> None:
    conf = OmegaConf.create({"lora.alpha": [16, 32], "lr": "interval(0, 1)", "x": None})
    distributions, fixed = parse_search_space(conf, [])
    assert distributions == {
        "lora.alpha": CategoricalDistribution([16, 32]),
        "lr": FloatDistribution(0, 1),
    }
    assert fixed == {"x": "null"}
    assert parse_search_space(None, []) == ({}, {})


def test_grid_of_three() -> None:
    distributions, _ = parse_search_space(None, ["lora.r=8,16,64"])
    assert is_grid(distributions)
    assert grid_values(distributions) == {"lora.r": [8, 16, 64]}


def test_grid_values_enumerate_each_distribution() -> None:
    overrides = [
        "a=range(1,3)",
        "b=range(0.5, 5.5, step=1)",
        "c=int(interval(1, 4))",
        "d=range(0, 1, 0.1)",
        "e=choice(adamw, sgd)",
    ]
    distributions, _ = parse_search_space(None, overrides)
    assert is_grid(distributions)
    grid = grid_values(distributions)
    assert grid == {
        "a": [1, 2, 3],
        "b": [0.5, 1.5, 2.5, 3.5, 4.5, 5.5],
        "c": [1, 2, 3, 4],
        "d": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
        "e": ["adamw", "sgd"],
    }
    for key, values in grid.items():
        dist = distributions[key]
        assert all(dist._contains(dist.to_internal_repr(v)) for v in values)


def test_grid_sampler_runs_every_point_once() -> None:
    distributions, _ = parse_search_space({"lora.r": "8,16,64"}, ["lora.alpha=range(16, 32, 16)"])
    sampler = optuna.samplers.GridSampler(grid_values(distributions), seed=0)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: sum(t._suggest(k, d) for k, d in distributions.items()), n_trials=20)
    points = {(t.params["lora.r"], t.params["lora.alpha"]) for t in study.trials}
    assert len(study.trials) == len(points) == 3 * 2


@pytest.mark.parametrize(
    "line, grid",
    [
        ("k=interval(0, 1)", False),
        ("k=tag(log, interval(1, 5))", False),
        ("k=tag(log, int(interval(1, 5)))", True),  # integers are discrete even on log scale
    ],
)
def test_is_grid_needs_every_distribution_discrete(line: str, grid: bool) -> None:
    distributions, _ = parse_search_space(None, ["lora.r=8,16", line])
    assert is_grid(distributions) is grid
    if grid:
        assert grid_values(distributions)["k"] == [1, 2, 3, 4, 5]
    else:
        with pytest.raises(SearchSpaceError, match=r"^search space: key 'k': .*; accepted: "):
            grid_values(distributions)


# (params, overrides, key, value as written, fragment of the accepted forms)
ERRORS = [
    (None, ["optimizer.lr=interval(5, 1)"], "optimizer.lr", "interval(5, 1)", "low < high"),
    (None, ["k=int(interval(5, 1))"], "k", "int(interval(5, 1))", "low < high"),
    (None, ["optimizer.lr=interval(1e-3,1e-3)"], "optimizer.lr", "interval(1e-3,1e-3)", "fixed as optimizer.lr=0.001"),
    (None, ["k=int(interval(3, 3))"], "k", "int(interval(3, 3))", "low < high"),
    (None, ["k=choice()"], "k", "choice()", "at least one"),
    ({"lora.r": []}, [], "lora.r", "[]", "at least one"),
    ({"m": [[1], [2]]}, [], "m", "[[1], [2]]", "str/int/float/bool/null"),
    (None, ["lr=tag(log, interval(0, 1))"], "lr", "tag(log, interval(0, 1))", "0 < low"),
    (None, ["n=tag(log, int(interval(0, 8)))"], "n", "tag(log, int(interval(0, 8)))", "0 < low"),
    (None, ["k=tag(log, range(1, 9))"], "k", "tag(log, range(1, 9))", "tag(log, interval("),
    (None, ["k=range(1, 5, 0)"], "k", "range(1, 5, 0)", "step > 0"),
    (None, ["k=range(1, 5, -1)"], "k", "range(1, 5, -1)", "start < stop"),
    (None, ["k=range(5, 1)"], "k", "range(5, 1)", "start < stop"),
    (None, ["k=range(3, 3)"], "k", "range(3, 3)", "start < stop"),
    (None, ["k=range(5, 1, -1)"], "k", "range(5, 1, -1)", "step > 0"),
    (None, ["k=shuffle(range(5, 1))"], "k", "shuffle(range(5, 1))", "start < stop"),
    (None, ["k=tag(foo, interval(0, 1))"], "k", "tag(foo, interval(0, 1))", "tag(log, "),
    (None, ["k=tag(log, foo, interval(1, 2))"], "k", "tag(log, foo, interval(1, 2))", "tag(log, "),
    (None, ["k=tag(log, choice(1, 2))"], "k", "tag(log, choice(1, 2))", "no tag on any"),
    (None, ["=5"], "", "5", "non-empty config key"),
    ({"": "1,2"}, [], "", "1,2", "non-empty config key"),
    ({"  ": 3}, [], "  ", "3", "non-empty config key"),
    (None, ["k=interval(1"], "k", "interval(1", "interval(low, high)"),
    (None, ["k=glob(*)"], "k", "glob(*)", "choice(a, b, ...)"),
    ({"k": {"a": 1}}, [], "k", "{'a': 1}", "choice(a, b, ...)"),
]


@pytest.mark.parametrize("params, overrides, key, value, accepted", ERRORS, ids=[str(e[1] or e[0]) for e in ERRORS])
def test_validation_error_is_one_line(params: Any, overrides: list[str], key: str, value: str, accepted: str) -> None:
    with pytest.raises(SearchSpaceError) as info:
        parse_search_space(params, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"search space: key {key!r}: ")
    assert value in message
    assert accepted in message.partition("; accepted: ")[2]
    assert isinstance(info.value, ValueError)


def test_sampler_block_keeps_its_own_settings_and_drops_another_samplers():
    """search=rank_alpha_lr's TPE settings stay in the block when a user picks another sampler."""
    from sweeper.errors import SweeperConfigError
    from sweeper.samplers import build_pruner, build_sampler

    tpe_block = {"seed": 3, "n_startup_trials": 5, "multivariate": True, "constant_liar": True}
    name, tpe = build_sampler({"name": "tpe", **tpe_block}, None, False)
    assert name == "tpe" and tpe._n_startup_trials == 5 and tpe._multivariate and tpe._constant_liar
    name, rnd = build_sampler({"name": "random", **tpe_block}, None, False)
    assert name == "random" and isinstance(rnd, optuna.samplers.RandomSampler)
    with pytest.raises(SweeperConfigError, match="sampler"):
        build_sampler({"name": "tpe", "n_startup_trails": 5}, None, False)  # a typo is no sampler's setting
    name, pruner, spec = build_pruner({"name": "hyperband", "n_startup_trials": 3, "n_warmup_steps": 20})
    assert isinstance(pruner, optuna.pruners.HyperbandPruner) and spec == {"name": "hyperband"}


def test_range_edges_names_the_best_params_at_an_end_of_their_range():
    from sweeper.results import range_edges

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.enqueue_trial({"lora.alpha": 64, "optimizer.lr": 2.95e-3, "lora.r": 16, "kind": "a"})
    study.enqueue_trial({"lora.alpha": 16, "optimizer.lr": 3e-4, "lora.r": 8, "kind": "a"})

    def objective(t):
        t.suggest_categorical("lora.alpha", [8, 16, 32, 64])
        t.suggest_float("optimizer.lr", 1e-5, 3e-3, log=True)
        t.suggest_int("lora.r", 8, 64, log=True)
        t.suggest_categorical("kind", ["a", "b", "c"])  # not numeric: no order, no edge
        return 0.0
    study.optimize(objective, n_trials=2)
    edges = range_edges(study.trials[0])
    assert set(edges) == {"lora.alpha", "optimizer.lr"} and "top of 1e-05..0.003" in edges["optimizer.lr"]
    assert set(range_edges(study.trials[1])) == {"lora.r"} and "bottom" in range_edges(study.trials[1])["lora.r"]
