"""How a sweep names things: its study, its folder, each trial's overrides, and the command that reproduces one."""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from sweeper.errors import SweeperConfigError

STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=,+-]{0,127}")


def hydra_value(v: Any) -> str:
    """A Python value as a Hydra override value (strings quoted, dicts and lists in Hydra's syntax), such that
    Hydra's override parser gives back exactly `v`: `k={hydra_value(s)}` parses to the string `s`, whatever it holds.

    In a quoted value Hydra un-escapes only backslashes that precede a quote (or the closing quote): a quote becomes
    `\\'`, the backslashes right before a quote or at the end are doubled, every other backslash stays as it is
    (`out\\dir` is `'out\\dir'`; doubling it would give the trial `out\\\\dir`, another folder)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    return "'" + _BEFORE_QUOTE.sub(lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), str(v)) + "'"


_BEFORE_QUOTE = re.compile(r"(\\*)('|\Z)")  # backslashes (maybe none) before a quote or the string's end


def short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def study_name(config: DictConfig, setting: str | None, arguments: list[str], params, objectives) -> str:
    """`hydra.sweeper.study_name`, or `<search preset>-<hash of the command's overrides>`: the same command, the
    same study, so a rerun resumes it."""
    if setting:
        name = str(setting)
    else:
        search = config.hydra.runtime.choices.get("search")
        name = f"{search or searched(arguments)}-{command_hash(arguments, params, objectives)}"
    if not STUDY_NAME.fullmatch(name) or ".." in name:
        raise SweeperConfigError("study_name", name, "letters, digits and _ . = , + - (no path separators), "
                                 "at most 128 characters")
    return name


def command_hash(arguments: list[str], params, objectives) -> str:
    key = json.dumps([sorted(arguments), params, objectives], sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def searched(arguments: list[str]) -> str:
    """What a command-line sweep searches, for its study's name: `grid-lora.r+optimizer.lr` (every swept value
    listed), `search-optimizer.lr` (an interval among them), `sweep` (nothing swept on the command line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    try:
        swept = [o for o in OverridesParser.create().parse_overrides(arguments) if o.is_sweep_override()]
    except Exception:  # noqa: BLE001  (refused later, with its own line)
        return "sweep"
    if not swept:
        return "sweep"
    kind = "search" if any(isinstance(o.value(), IntervalSweep) for o in swept) else "grid"
    keys = "+".join(sorted(re.sub(r"[^A-Za-z0-9_.=,+-]", "", o.get_key_element().lstrip("+~")) for o in swept))
    return f"{kind}-{keys[:80]}"


def legacy_study_name(config: DictConfig, setting: str | None, arguments: list[str], params, objectives) -> str | None:
    """The name a study of this command had before names said what was searched (`sweep-<hash>`): a rerun of an
    older command resumes that study."""
    if setting or config.hydra.runtime.choices.get("search"):
        return None
    return f"sweep-{command_hash(arguments, params, objectives)}"


def sweep_dir(config: DictConfig, study_dir: str, name: str) -> Path:
    """`hydra.sweep.dir` when the command line or the app's config sets one without `${now:...}`; else
    `<study_dir>/<study_name>`: a timestamped folder would scatter a resumed study's trials over several."""
    written = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("dir")
    on_command_line = any(o.split("=", 1)[0] == "hydra.sweep.dir" for o in config.hydra.overrides.hydra)
    use_own = on_command_line or (isinstance(written, str) and "${now:" not in written)
    folder = Path(config.hydra.sweep.dir) if use_own else Path(study_dir) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SweeperConfigError("hydra.sweep.dir" if use_own else "study_dir", str(folder),
                                 f"a folder this process can write ({e.strerror or e})") from None
    with open_dict(config):
        config.hydra.sweep.dir = str(folder)
    return folder


def has_key(config: DictConfig, key: str | None) -> bool:
    """The app's config has `key` (qlora_exp's run_name and callbacks; another app may have neither)."""
    from sweeper.jobs import config_has_key

    return bool(key) and config_has_key(config, key)


def this_command() -> str:
    """How this sweep was started, as a user would type it: `python -m pkg` or `python path/app.py`."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return f"python {sys.argv[0]}" if sys.argv and sys.argv[0] else "python"
