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
        group = CONF_DIR / key
        if o.is_delete() or not group.is_dir() or key.startswith("hydra"):
            continue
        values = [str(v) for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.value()]
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for v in values:
            if v not in (None, "null") and v not in options:
                raise ConfigError(key, v, "one of " + ", ".join(options))


def cli() -> None:
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    main()  # pylint: disable=no-value-for-parameter


if __name__ == "__main__":
    cli()
