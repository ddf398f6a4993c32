"""`python -m qlora_exp [overrides]`: one trial; `python -m qlora_exp -m key=a,b,...`: a sweep.

The decorated `main` only composes, names the trial's TensorBoard run and returns the objective;
the trial itself is `qlora_exp.trial.run_trial`, a plain function of the config.
"""
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

import qlora_exp  # noqa: F401  (registers the config resolvers)
from qlora_exp.errors import ConfigError

log = logging.getLogger("qlora_exp")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# the sweeper's and launchers' config groups (hydra_plugins/qlora_exp_sweeper/searchpath.py puts them on the search path)
PLUGIN_CONF = Path(__file__).resolve().parent.parent / "hydra_plugins" / "qlora_exp_sweeper" / "conf"


def tensorboard_run_dir(cfg: DictConfig) -> str:
    """<tensorboard_root>/<sweep folder or "runs">/<trial number and swept values, or run folder>."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    root = Path(cfg.paths.tensorboard_root)
    if hc.mode != RunMode.MULTIRUN:
        return str(root / "runs" / Path(hc.runtime.output_dir).name)
    name = cfg.get("run_name")
    if not name:
        swept = _swept_keys(sys.argv[1:])
        values = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
        name = "-".join([f"{hc.job.num:03d}", *values])
    return str(root / Path(hc.sweep.dir).name / name.replace("/", "_"))


def _swept_keys(argv: list[str]) -> set[str]:
    """Keys the command line sweeps over (`key=a,b`, `key=range(...)`), e.g. {"lora.r"}."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
    except Exception:
        return set()
    return {o.get_key_element().lstrip("+~") for o in overrides if o.is_sweep_override()}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from qlora_exp.trial import run_trial

    with open_dict(cfg):
        if not cfg.paths.get("tensorboard_dir"):
            cfg.paths.tensorboard_dir = tensorboard_run_dir(cfg)
    try:
        result = run_trial(cfg)
    except ConfigError as e:
        log.debug("refused: %s", e)  # into the run's log file
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        # a full or read-only disk mid-trial: one line for a single run; a sweep's trial keeps the exception,
        # which becomes its FAIL reason in the study
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.debug("trial failed: %s", e, exc_info=True)
        print(f"error: trial failed: {type(e).__name__}: {e} (trial folder {cfg.paths.output_dir}, TensorBoard run "
              f"{cfg.paths.tensorboard_dir}; what they hold so far stays)", file=sys.stderr)
        raise SystemExit(1) from None
    return result.objective


def check_group_choices(argv: list[str]) -> None:
    """Refuse `group=option` overrides naming an option conf/ does not have, in one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    overrides = []
    for arg in (a for a in argv if "=" in a and not a.startswith("-")):
        try:
            overrides += parser.parse_overrides([arg])
        except OverrideParseException as e:
            key, value = arg.split("=", 1)
            lines = [x.strip() for x in str(e).splitlines()[1:] if x.strip() and not x.strip().startswith("See ")]
            reason = lines[0] if lines else "not parseable"
            raise ConfigError(key, value, f"Hydra's override grammar ({reason})") from None
    for o in overrides:
        key = o.get_key_element().lstrip("~+")
        # conf/'s groups, and the sweeper's sampler and pruner groups (other hydra/* groups may come from plugins)
        group = PLUGIN_CONF / key if key in ("hydra/sweeper/sampler", "hydra/sweeper/pruner") else CONF_DIR / key
        if o.is_delete() or not group.is_dir() or (key.startswith("hydra") and not group.is_relative_to(PLUGIN_CONF)):
            continue
        values = [str(v) for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.value()]
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for v in values:
            if v not in (None, "null") and v not in options:
                raise ConfigError(key, v, "one of " + ", ".join(options))


def check_command(argv: list[str]) -> None:
    """Compose the command's config as Hydra will and refuse, as a ConfigError, what can never run: an
    unknown key, a value of the wrong type, an interpolation that does not resolve, a value the checks
    refuse (with -m: in the fixed overrides; a swept key must exist, its values are each trial's own),
    bad data files, an output folder that cannot be written. Before Hydra creates any folder and before
    the sweeper opens the study. Machine-specific checks (bf16, fp16) wait for the trial's own machine."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from qlora_exp.data import load_rows
    from qlora_exp.device import DeviceInfo
    from qlora_exp.validate import check_config

    args, _ = get_args_parser().parse_known_args(argv)
    if any(getattr(args, k, None) for k in ("help", "hydra_help", "cfg", "shell_completion", "info", "config_path",
                                            "config_dir", "experimental_rerun")):
        return
    compose_args, swept = [], []
    for o in OverridesParser.create().parse_overrides(args.overrides):
        key = o.get_key_element()
        if not o.is_sweep_override():
            compose_args.append(o.input_line)
        elif not args.multirun:
            raise ConfigError(key, o.input_line.split("=", 1)[1], "one value ([a,b] for a list, 'a,b' quoted for a "
                              "string), or add -m to sweep over it")
        elif (CONF_DIR / key.lstrip("+~")).is_dir():  # a group: its first option, so its keys exist
            compose_args.append(f"{key}={next(iter(o.sweep_string_iterator()))}")
        else:
            swept.append((key, o.input_line.split("=", 1)[1]))
    cfg = _compose(args.config_name or "config", compose_args, argv)
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) if args.multirun else None
    for key, value in [*swept, *((str(k), str(v)) for k, v in (params or {}).items())]:
        if not key.startswith(("+", "~")) and OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            raise _unknown_key(cfg, key, value)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.set_struct(task, False)
    task.paths.output_dir = str(Path(cfg.paths.output_root) / "runs" / "check")  # ${hydra:...} has no value yet
    _check_interpolations(task)
    check_config(task, DeviceInfo(cuda=True, bf16=True, n_gpus=1, name="the trial's machine"))
    if task.data.source == "jsonl":
        load_rows(task.data, task.trainer.seed)
    folders = [("paths.output_root", task.paths.output_root), ("paths.tensorboard_root", task.paths.tensorboard_root)]
    if not args.multirun:
        folders.append(("hydra.run.dir", cfg.hydra.run.dir))
    for key, folder in folders:
        _check_writable(key, Path(folder))


_ABSENT = object()


def _compose(config_name: str, overrides: list[str], argv: list[str]):
    """Hydra's own composition (hydra.main's), with its errors as one-line ConfigErrors."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="qlora_exp"):
        try:
            return GlobalHydra.instance().hydra.compose_config(config_name, overrides, run_mode=RunMode.RUN,
                                                               from_shell=True, with_log_configuration=False)
        except (HydraException, OmegaConfBaseException) as e:
            import re

            cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
            named = re.search(r"'([^']+)'", str(e)) or re.search(r"override (\S+)", str(e))  # the override's key
            key = named.group(1).split("=", 1)[0].lstrip("+~") if named else getattr(cause, "full_key", None) or "?"
            value = next((a.split("=", 1)[1] for a in argv if "=" in a and a.split("=", 1)[0].lstrip("+~") == key), "")
            if "not in struct" in str(cause) or "does not exist" in str(cause):
                base = GlobalHydra.instance().hydra.compose_config(
                    config_name, [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key],
                    run_mode=RunMode.RUN, from_shell=True, with_log_configuration=False)
                raise _unknown_key(base, key, value) from None
            raise ConfigError(key, value, _first_line(cause)) from None


def _unknown_key(cfg, key: str, value: str) -> ConfigError:
    """`lora.rank=8`: name the keys its nearest existing parent has."""
    from omegaconf import DictConfig, OmegaConf

    parent = key.rsplit(".", 1)[0] if "." in key else ""
    while parent and not isinstance(OmegaConf.select(cfg, parent, default=None), DictConfig):
        parent = parent.rsplit(".", 1)[0] if "." in parent else ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = ", ".join(sorted(str(k) for k in node if k != "hydra"))
    return ConfigError(key, value, f"a key of {parent or 'the config'}: {keys} (+{key}=... adds a new key)")


def _check_interpolations(node, prefix: str = "") -> None:
    """Every `${...}` resolves; the first that does not is named with the text as written."""
    from omegaconf import DictConfig, ListConfig

    for k in (node.keys() if isinstance(node, DictConfig) else range(len(node))):
        key = f"{prefix}.{k}" if prefix else str(k)
        try:
            value = node[k]
        except Exception as e:  # noqa: BLE001  (omegaconf's interpolation errors)
            raise ConfigError(key, node._get_node(k)._value(), f"an interpolation that resolves ({_first_line(e)})"
                              ) from None
        if isinstance(value, (DictConfig, ListConfig)):
            _check_interpolations(value, key)


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


def _check_writable(key: str, folder: Path) -> None:
    """The folder, or the nearest one above it that exists, takes a new file: not read-only, not full."""
    import tempfile

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing) as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(key, str(folder), f"a folder this process can write ({e.strerror or e})") from None


def cli() -> None:
    try:
        check_group_choices(sys.argv[1:])
        try:
            check_command(sys.argv[1:])
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001  (what the check cannot read, Hydra reports in its own words)
            log.debug("command check skipped: %s", e)
    except ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    main()  # pylint: disable=no-value-for-parameter


if __name__ == "__main__":
    cli()
