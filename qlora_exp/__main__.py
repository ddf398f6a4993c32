"""`python -m qlora_exp [overrides]`: one trial; `python -m qlora_exp -m key=a,b,...`: a sweep.

The decorated `main` only composes, names the trial's TensorBoard run and returns the objective;
the trial itself is `qlora_exp.trial.run_trial`, a plain function of the config.
"""
import logging
import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

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
    from sweeper.bytecode import say_early_note

    say_early_note()  # a single run's bytecode cache, set up by its command checks (a sweep's sweeper says its own)
    with open_dict(cfg):
        if not cfg.paths.get("tensorboard_dir"):
            cfg.paths.tensorboard_dir = tensorboard_run_dir(cfg)
    try:
        result = run_trial(cfg)
    except ConfigError as e:
        log.debug("refused: %s", mask_passwords(str(e)))  # into the run's log file
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {'' if e.context else needs_prefix(cfg)}{mask_passwords(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        # a full or read-only disk mid-trial: one line for a single run; a sweep's trial keeps the exception,
        # which becomes its FAIL reason in the study
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.debug("trial failed: %s", e, exc_info=True)
        print(mask_passwords(f"error: trial failed: {type(e).__name__}: {e} (trial folder {cfg.paths.output_dir}, "
                             f"TensorBoard run {cfg.paths.tensorboard_dir}; what they hold so far stays)"), file=sys.stderr)
        raise SystemExit(1) from None
    return result.objective


def needs_prefix(cfg: DictConfig, overrides: list[str] | None = None) -> str:
    """`experiment=article_recipe needs a GPU with bf16 and the Hugging Face hub (...): ` when the config says it needs
    something (its `needs` key): a refusal on a machine without it then says what the recipe is for. `overrides`:
    the command's (before Hydra runs the job), else Hydra's record of its choices."""
    needs = OmegaConf.select(cfg, "needs", default=None)
    if not needs:
        return ""
    if overrides is not None:
        experiment = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("experiment=")), None)
    else:
        from hydra.core.hydra_config import HydraConfig

        experiment = HydraConfig.get().runtime.choices.get("experiment")
    return f"{f'experiment={experiment}' if experiment else 'this config'} needs {needs}: "


def check_group_choices(argv: list[str]) -> None:
    """Refuse `group=option` overrides naming an option Hydra cannot find, in one line; an override Hydra's grammar
    cannot read, in one line too. The options are Hydra's own: conf/, the plugins' groups and the command's
    `hydra.searchpath` (a user's own `search=my_space` from their own folder)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    overrides = []
    for arg in (a for a in argv if "=" in a and not a.startswith("-")):
        try:
            overrides += parser.parse_overrides([arg])
        except OverrideParseException as e:
            key, value = arg.split("=", 1)
            raise ConfigError(key, value, f"Hydra's override grammar ({_grammar_reason(e, arg)})") from None
    options = GroupOptions(argv)
    for o in overrides:
        key = o.get_key_element().lstrip("~+")
        group = options(key)
        if o.is_delete() or not group:
            continue
        values = [str(v) for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.value()]
        for v in values:
            if v not in (None, "null") and v not in group:
                raise ConfigError(key, v, "one of " + ", ".join(group))


def _grammar_reason(e: Exception, arg: str) -> str:
    """Hydra's reason, in a line: its first, unless that is the override again with a caret under a character."""
    lines = [x for x in str(e).splitlines() if x.strip() and not x.strip().startswith("See ")]
    if len(lines) >= 2 and lines[1].strip() == "^" and lines[0].endswith(arg):
        at = len(lines[1].rstrip()) - 1 - (len(lines[0]) - len(arg)) - len(arg.split("=", 1)[0]) - 1
        value = arg.split("=", 1)[1]
        if 0 <= at < len(value):
            return (f"{value[at]!r} at character {at + 1} of the value cannot stand there unquoted: quote the value, "
                    "with a backslash before a quote inside it")
    rest = [x.strip() for x in lines[1:] if x.strip() != "^"] or [x.strip() for x in lines[:1]]
    return rest[0] if rest else "not parseable"


class GroupOptions:
    """`options(group)`: the sorted options of a config group as Hydra finds them for this command (its
    `hydra.searchpath` included), or [] when `group` is no config group."""

    def __init__(self, argv: list[str]):
        from hydra._internal.utils import get_args_parser

        args, _ = get_args_parser().parse_known_args(argv)
        self.config_name = args.config_name or "config"
        self.searchpath = [a for a in args.overrides if a.split("=", 1)[0] == "hydra.searchpath"]
        self.cache: dict[str, list[str]] = {}

    def __call__(self, group: str) -> list[str]:
        if group not in self.cache:
            self.cache[group] = self._ask_hydra(group) if group and "." not in group else []
        return self.cache[group]

    def _ask_hydra(self, group: str) -> list[str]:
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="qlora_exp"):
                return sorted(GlobalHydra.instance().config_loader().get_group_options(
                    group, config_name=self.config_name, overrides=self.searchpath))
        except Exception as e:  # noqa: BLE001  (a search path Hydra cannot use: Hydra says so in its own words)
            log.debug("options of %s not known: %s", group, e)
            return []


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
    from qlora_exp.hub import check_reachable
    from qlora_exp.validate import check_config, check_lengths

    args, _ = get_args_parser().parse_known_args(argv)
    if any(getattr(args, k, None) for k in ("help", "hydra_help", "cfg", "shell_completion", "info", "config_path",
                                            "config_dir", "experimental_rerun")):
        return
    compose_args, swept = [], []
    groups = GroupOptions(argv)
    for o in OverridesParser.create().parse_overrides(args.overrides):
        key = o.get_key_element()
        if key.lstrip("+~") == "search" and not args.multirun and o.value() not in (None, "null"):
            raise ConfigError(key, o.input_line.split("=", 1)[1], "with -m only: a search space is what a sweep "
                              f"searches (python -m qlora_exp -m {o.input_line}); without -m one trial runs, "
                              "and it would ignore the search")
        if not o.is_sweep_override():
            compose_args.append(o.input_line)
        elif o.is_hydra_override():  # Hydra sweeps none of its own settings: a comma in a value, most likely
            value = o.input_line.split("=", 1)[1]
            raise ConfigError(key, value, "one value: Hydra's own settings are not swept, and a comma makes a sweep: "
                              + ("write a comma in a URL as %2C, or quote the value ('a,b')" if "://" in value else
                                 "quote a value that holds one ('a,b'), [a,b] for a list"))
        elif not args.multirun:
            raise ConfigError(key, o.input_line.split("=", 1)[1], "one value ([a,b] for a list, 'a,b' quoted for a "
                              "string), or add -m to sweep over it")
        elif groups(key.lstrip("+~")):  # a group: its first option, so its keys exist
            compose_args.append(f"{key}={next(iter(o.sweep_string_iterator()))}")
        else:
            swept.append((key, o.input_line.split("=", 1)[1]))
    cfg = _compose(args.config_name or "config", compose_args, argv)
    # the checks below import transformers and torch: from the bytecode cache, where the environment forbids writing
    # bytecode (a sweep's, and a single run's: it imports the same stack, 16 s from source on the H100 against 7 s)
    _cache_bytecode_first(OmegaConf.select(cfg, "hydra.sweeper.bytecode_cache", default=None), single=not args.multirun)
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) if args.multirun else None
    for key, value in [*swept, *((str(k), str(v)) for k, v in (params or {}).items())]:
        if not key.startswith(("+", "~")) and OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            raise _unknown_key(cfg, key, value)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.set_struct(task, False)
    task.paths.output_dir = str(Path(cfg.paths.output_root) / "runs" / "check")  # ${hydra:...} has no value yet
    _check_interpolations(task)
    try:
        check_config(task, DeviceInfo(cuda=True, bf16=True, n_gpus=None, name="the trial's machine"))
        check_reachable(task)  # a hub dataset or model and no hub: one line now, not half a minute of retries
    except ConfigError as e:  # what the config says it needs comes first (an experiment's `needs`)
        raise ConfigError(e.key, e.value, e.accepted, needs_prefix(cfg, args.overrides)) from None
    if task.data.source == "jsonl":
        train, evals = load_rows(task.data, task.trainer.seed)
        check_lengths(task, train, evals)  # imports transformers: last, after every cheaper check
    folders = [("paths.output_root", task.paths.output_root), ("paths.tensorboard_root", task.paths.tensorboard_root)]
    if not args.multirun:
        folders.append(("hydra.run.dir", cfg.hydra.run.dir))
    for key, folder in folders:
        _check_writable(key, Path(folder))


_ABSENT = object()


def _cache_bytecode_first(setting, single: bool) -> None:
    """The bytecode cache (sweeper/bytecode.py) before the checks here import transformers and torch. The sweeper
    set it up only as its sweep began, too late for them, and with one worker the driver is the worker, so it
    compiled torch and transformers from source at every sweep where the environment forbids writing bytecode (8.1 s
    of an 18 s first ask on the H100); a single run (`single`) never set it up. A setting the sweeper will refuse is
    left to it."""
    from sweeper.bytecode import cache_bytecode

    if setting is False or (isinstance(setting, str) and setting.strip()):
        cache_bytecode(setting, say=False, single=single)


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
        except ValueError as e:  # Hydra's own, e.g. a group set to null ("must be a string or a list")
            key, _, value = next((a for a in argv if "=" in a and "null" in a.split("=", 1)[1]), "?=?").partition("=")
            raise ConfigError(key, value, f"{_first_line(e)}: a group takes one of its options, or ~{key.lstrip('+~')} "
                              "leaves it out") from None
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
    if {"-v", "--verbose"} & set(sys.argv[1:]):  # everything on the terminal (qlora_exp.quiet), in every trial process
        sys.argv = [a for a in sys.argv if a not in ("-v", "--verbose")]
        os.environ["QLORA_EXP_VERBOSE"] = "1"
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
            raise ConfigError(e.key, mask_passwords(str(e.value)), mask_passwords(e.accepted), e.context) from None
        print(f"error: {mask_passwords(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    main()  # pylint: disable=no-value-for-parameter


# a database URL's password: `scheme://user:PASSWORD@host` (sqlalchemy's reading: up to the @; here the last one)
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)([^\s]*)@")


def mask_passwords(text: str, argv: list[str] | None = None) -> str:
    """`text` with every database password as ***: each one written in the command's arguments (`argv`, default
    sys.argv), wherever it appears, whatever it holds (quotes, commas, spaces), and any `scheme://user:...@` form."""
    secrets = set()
    for arg in sys.argv[1:] if argv is None else argv:
        for m in re.finditer(r"://[^\s:/@'\"]*:(.+)@", arg):
            secrets |= {m.group(1), repr(m.group(1))[1:-1]}
    for secret in sorted((x for x in secrets if x), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _URL_PASSWORD.sub(lambda m: m.group(1) + "***@", text)


if __name__ == "__main__":
    cli()
