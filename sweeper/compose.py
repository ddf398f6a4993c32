"""Hydra's `load_sweep_config`, remembered: a trial config that differs from one composed before only in the values
of plain keys is that config with the values set, as Hydra's own override step sets them.

Composing a trial's config from its overrides (the defaults list, every group's file, the overrides) takes 0.2-0.4 s;
a sweep composes one per value it checks before starting and one per trial it runs, and a sweep worker runs trial
after trial in one process. Between two points of `-m lora.r=8,16 optimizer.lr=1e-4,2e-4` only the values of
`lora.r` and `optimizer.lr` differ, so the second config is the first with those values put in by
`OmegaConf.update(cfg, key, value, merge=True)`, exactly Hydra's step for a `key=value` override
(`ConfigLoaderImpl._apply_overrides_to_config`), and the override lists and `hydra.job.override_dirname`
recomputed from the new overrides. Anything else (a config group, `+key`/`~key`, a Hydra setting, a dict value,
a key whose node is a dict, an override Hydra would refuse) composes through Hydra, whose result is remembered for
the next one; a fast config that raises falls back to Hydra too, so a refusal is always Hydra's own words.
"""
from __future__ import annotations

import copy
import os
from typing import Any

from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf

_PARSER = OverridesParser.create()
KEEP = 8  # composed configs remembered per loader (one per set of groups and fixed values, in practice one)


class SweepComposer:
    """`compose(overrides)` == `loader.load_sweep_config(master, overrides)`, the plain-value case without Hydra."""

    def __init__(self, loader: Any, master: DictConfig) -> None:
        self.loader, self.master = loader, master
        self._seen: list[tuple[tuple, list[Override], DictConfig]] = []  # (shape, parsed overrides, composed config)
        self._groups: dict[str, bool] = {}
        self.fast = self.composed = 0  # how many configs came each way (tests read them)

    def __call__(self, overrides: list[str]) -> DictConfig:
        hydra_overrides = list(OmegaConf.to_container(self.master.hydra.overrides.hydra))
        parsed = _PARSER.parse_overrides([*hydra_overrides, *overrides])
        shape = tuple(self._shape(o) for o in parsed)
        for seen_shape, seen_parsed, seen_cfg in self._seen:
            if seen_shape == shape:
                cfg = self._with_values(seen_cfg, seen_parsed, parsed)
                if cfg is not None:
                    self.fast += 1
                    return cfg
        cfg = self.loader.load_sweep_config(self.master, list(overrides))
        self.composed += 1
        self._seen = [(shape, parsed, copy.deepcopy(cfg)), *self._seen][:KEEP]
        return cfg

    def _shape(self, o: Override) -> tuple:
        """What must be equal for two override lists to compose alike: the override itself, or for a plain
        `key=value` its key alone (its value is what the fast path sets)."""
        if self._plain(o):
            return ("value", o.key_or_group)
        return ("as is", o.input_line)

    def _plain(self, o: Override) -> bool:
        return (o.type == OverrideType.CHANGE and o.package is None and not o.is_hydra_override()
                and not o.is_sweep_override() and _scalar_or_list(o.value())
                and not self._group(o.key_or_group))

    def _group(self, key: str) -> bool:
        if key not in self._groups:
            self._groups[key] = self.loader.repository.group_exists(key)  # Hydra's own test (defaults_list.py)
        return self._groups[key]

    def _with_values(self, seen_cfg: DictConfig, seen: list[Override], parsed: list[Override]) -> DictConfig | None:
        cfg = copy.deepcopy(seen_cfg)
        try:
            for old, new in zip(seen, parsed, strict=True):
                if old.input_line == new.input_line or not self._plain(new):
                    continue
                node = OmegaConf.select(cfg, new.key_or_group, default=None, throw_on_missing=False)
                if isinstance(node, DictConfig):  # a dict replaced by a value: Hydra's error, in Hydra's words
                    return None
                OmegaConf.update(cfg, new.key_or_group, new.value(), merge=True)
            app = [o for o in parsed if not o.is_hydra_override()]
            cfg.hydra.overrides.task = [o.input_line for o in app]
            job = cfg.hydra.job
            job.override_dirname = get_overrides_dirname(overrides=app, kv_sep=job.config.override_dirname.kv_sep,
                                                         item_sep=job.config.override_dirname.item_sep,
                                                         exclude_keys=job.config.override_dirname.exclude_keys)
            cfg.hydra.runtime.cwd = os.getcwd()
            for key in job.env_copy:
                job.env_set[key] = os.environ[key]
        except Exception:  # noqa: BLE001  (whatever the shortcut cannot do, Hydra composes and words)
            return None
        OmegaConf.copy_cache(from_config=self.master, to_config=cfg)
        return cfg


def _scalar_or_list(value: Any) -> bool:
    if isinstance(value, list):
        return all(_scalar_or_list(v) and not isinstance(v, list) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


_COMPOSERS: dict[int, SweepComposer] = {}


def composer(loader: Any, master: DictConfig) -> SweepComposer:
    """The composer of this loader and master config (one per sweep, kept for the process's life: a worker's)."""
    key = id(master)
    c = _COMPOSERS.get(key)
    if c is None or c.master is not master or c.loader is not loader:
        c = _COMPOSERS[key] = SweepComposer(loader, master)
    return c
