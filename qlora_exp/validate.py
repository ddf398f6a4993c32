"""Check a composed config before any model or dataset is loaded.

Every check raises `ConfigError(key, value, accepted)`: one line naming the key, the value and what
would be accepted. `check_config` is pure apart from looking at the file system (data paths, a local model
folder's config.json); `check_lengths` also tokenizes the rows, with the trial's tokenizer.
"""
import logging
import math
import os
from pathlib import Path

from omegaconf import DictConfig

from qlora_exp.device import DeviceInfo
from qlora_exp.engines import check_engine
from qlora_exp.errors import ConfigError
from qlora_exp.packing import LAYOUTS

log = logging.getLogger(__name__)
_ABSENT = object()
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANT_METHODS = ("nf4", "fp4", "int8", "none")
QUANT_STORAGE = ("uint8", "float16", "bfloat16", "float32")
LORA_BIAS = ("none", "all", "lora_only")
TARGET_PRESETS = ("all_linear", "attention", "mlp")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DATA_SOURCES = ("jsonl", "hub")
OBJECTIVES = ("eval_loss", "perplexity", "train_tokens_per_s", "peak_memory_gb", "wall_time_s")
# transformers' SchedulerType, every one (tests/test_validation.py compares): the two *_min_lr ones take
# optimizer.min_lr_rate, warmup_stable_decay optimizer.cooldown (qlora_exp.builders.lr_scheduler_kwargs); the rest need
# nothing more. A name a newer transformers adds is refused until it is added here with what it needs.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")
POLYNOMIAL_LR_END = 1e-7  # transformers' get_polynomial_decay_schedule_with_warmup default: lr must be above it
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused", "adamw_8bit",
              "adamw_bnb_8bit", "paged_lion_32bit", "paged_lion_8bit", "lion_8bit", "lion_32bit",
              "adafactor", "sgd")
CUDA_ONLY_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit",
                        "paged_lion_32bit", "paged_lion_8bit", "lion_8bit", "lion_32bit", "adamw_torch_fused")


def _one_of(key: str, value, options) -> None:
    if value not in options:
        raise ConfigError(key, value, "one of " + ", ".join(map(str, options)))


def _number(key: str, value, *, low=None, low_open=False, high=None, high_open=False, integer=False) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(key, value, kind)
    if not math.isfinite(value):  # NaN passes every comparison below, inf most
        raise ConfigError(key, value, f"a finite {kind.split(' ', 1)[1]}")
    rng = []
    if low is not None:
        rng.append(f"{'>' if low_open else '>='} {low}")
        if value < low or (low_open and value == low):
            raise ConfigError(key, value, f"{kind} {' and '.join(rng)}")
    if high is not None:
        rng.append(f"{'<' if high_open else '<='} {high}")
        if value > high or (high_open and value == high):
            raise ConfigError(key, value, f"{kind} {' and '.join(rng)}")


def resolve_target_modules(cfg: DictConfig) -> list[str]:
    """`lora.target_modules` (a preset name or a list) -> the model's projection names."""
    attn, mlp = list(cfg.model.attention_modules), list(cfg.model.mlp_modules)
    known = attn + mlp
    value = cfg.lora.target_modules
    if isinstance(value, str):
        presets = {"all_linear": known, "attention": attn, "mlp": mlp}
        if value not in presets:
            raise ConfigError("lora.target_modules", value,
                              f"a preset ({', '.join(TARGET_PRESETS)}) or a list of {', '.join(known)}")
        return presets[value]
    names = list(value)
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ConfigError("lora.target_modules", names,
                          f"a non-empty list of the {cfg.model.name} projections: {', '.join(known)}")
    return names


def check_config(cfg: DictConfig, device: DeviceInfo) -> None:
    """Refuse a config that cannot run here; return None when it can."""
    m, q, lora, opt, tr, data = cfg.model, cfg.quantization, cfg.lora, cfg.optimizer, cfg.trainer, cfg.data
    # model
    _one_of("model.random_build", m.get("random_build", "full"), ("full", "quantized"))
    if m.get("random_init") and m.get("random_build") == "quantized" and cfg.quantization.method not in ("nf4", "fp4"):
        raise ConfigError("quantization.method", cfg.quantization.method, "nf4 or fp4 with model.random_build=quantized "
                          "(a base built in 4 bits), or model.random_build=full")
    if not m.random_init and not m.name_or_path:
        raise ConfigError("model.name_or_path", m.name_or_path, "a hub id or local path, or model.random_init=true")
    _one_of("model.dtype", m.dtype, DTYPES)
    if not isinstance(m.trust_remote_code, bool):
        raise ConfigError("model.trust_remote_code", m.trust_remote_code, "true or false")
    if not m.random_init:
        check_model_source(m)
    if m.get("pretrain") is not None:
        check_pretrain(m)
    # quantization
    _one_of("quantization.method", q.method, QUANT_METHODS)
    _one_of("quantization.compute_dtype", q.compute_dtype, DTYPES)
    _one_of("quantization.upcast_frozen", q.get("upcast_frozen", False), (True, False))
    _one_of("quantization.cache", q.get("cache", False), (True, False))
    if q.get("quant_storage") is not None:
        _one_of("quantization.quant_storage", q.quant_storage, QUANT_STORAGE)
    # lora
    _number("lora.r", lora.r, low=1, integer=True)
    _number("lora.alpha", lora.alpha, low=0, low_open=True)
    _number("lora.dropout", lora.dropout, low=0, high=1, high_open=True)
    _one_of("lora.bias", lora.bias, LORA_BIAS)
    resolve_target_modules(cfg)
    # optimizer
    _one_of("optimizer.name", opt.name, OPTIMIZERS)
    _number("optimizer.lr", opt.lr, low=0, low_open=True)
    _number("optimizer.weight_decay", opt.weight_decay, low=0)
    _one_of("optimizer.scheduler", opt.scheduler, SCHEDULERS)
    _number("optimizer.warmup", opt.warmup, low=0)
    _check_scheduler(opt, tr.max_steps)
    if opt.max_grad_norm is not None:
        _number("optimizer.max_grad_norm", opt.max_grad_norm, low=0, low_open=True)
    # trainer
    _number("trainer.batch_size", tr.batch_size, low=1, integer=True)
    _number("trainer.grad_accum", tr.grad_accum, low=1, integer=True)
    micro = tr.get("micro_batch_size")
    if micro not in (None, "auto"):
        _number("trainer.micro_batch_size", micro, low=1, integer=True)
        if (tr.batch_size * tr.grad_accum) % micro:
            raise ConfigError("trainer.micro_batch_size", micro, f"null, auto or a divisor of trainer.batch_size x "
                              f"trainer.grad_accum = {tr.batch_size * tr.grad_accum} (the examples per step)")
    if tr.get("memory_budget_gb") is not None:
        _number("trainer.memory_budget_gb", tr.memory_budget_gb, low=0, low_open=True)
    _one_of("trainer.gradient_checkpointing", tr.gradient_checkpointing, (True, False, "auto"))
    if tr.get("checkpointed_layers") is not None:
        _number("trainer.checkpointed_layers", tr.checkpointed_layers, low=0, high=cfg.model.shape.num_hidden_layers,
                integer=True)
    _one_of("trainer.offload_checkpoints", tr.get("offload_checkpoints", False), (True, False, "auto"))
    _one_of("trainer.compile_layers", tr.get("compile_layers", False), (True, False))
    _one_of("trainer.packing", tr.packing, (True, False))
    _one_of("trainer.packing_layout", tr.packing_layout, ("auto", *LAYOUTS))
    _one_of("trainer.fused_kernels", tr.fused_kernels, (True, False, "auto"))
    _number("trainer.max_steps", tr.max_steps, low=-1, integer=True)
    if tr.max_steps == 0:
        raise ConfigError("trainer.max_steps", 0, "an integer >= 1, or -1 to train for trainer.epochs")
    _number("trainer.epochs", tr.epochs, low=0, low_open=True)
    _number("trainer.max_length", tr.max_length, low=1, integer=True)  # the real floor needs the data and the
    # tokenizer: check_max_length
    _number("trainer.eval_every", tr.eval_every, low=1, integer=True)
    _number("trainer.seed", tr.seed, low=0, high=2**32 - 1, integer=True)  # numpy's seed range
    if tr.get("num_workers") is not None:
        _number("trainer.num_workers", tr.num_workers, low=0, integer=True)
    _number("trainer.log_every", tr.log_every, low=1, integer=True)
    gpus = tr.get("gpus", 1)
    _number("trainer.gpus", gpus, low=1, integer=True)
    if gpus > 1 and device.cuda and device.n_gpus is not None and gpus > device.n_gpus:  # None: not this machine
        raise ConfigError("trainer.gpus", gpus, f"at most {device.n_gpus}: the GPUs this process sees "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if gpus > 1 and (tr.batch_size * tr.grad_accum) % gpus:
        raise ConfigError("trainer.gpus", gpus, f"1 or a divisor of trainer.batch_size x trainer.grad_accum = "
                          f"{tr.batch_size * tr.grad_accum} (each process trains an equal share of every step's examples)")
    _one_of("trainer.precision", tr.precision, PRECISIONS)
    if tr.precision == "bf16" and not device.bf16:
        raise ConfigError("trainer.precision", "bf16", "auto or fp32 on this machine: it has no GPU with bf16"
                          if not device.cuda else "auto, fp16 or fp32: this GPU has no bf16")
    if tr.precision == "fp16" and not device.cuda:
        raise ConfigError("trainer.precision", "fp16", "auto or fp32 on this machine: fp16 training needs a GPU")
    for key in ("model.dtype", "quantization.compute_dtype"):
        value = m.dtype if key == "model.dtype" else q.compute_dtype
        if value == "bfloat16" and not device.bf16 and device.cuda:
            raise ConfigError(key, value, "auto, float16 or float32: this GPU has no bf16")
    # data
    _one_of("data.source", data.source, DATA_SOURCES)
    if data.source == "jsonl":
        for key in ("train_path", "eval_path"):
            path = data.get(key)
            if path is None and key == "eval_path":
                continue
            if path is None or not Path(path).is_file():
                raise ConfigError(f"data.{key}", path, "an existing JSON-lines file")
    else:
        if not data.get("hub_name"):
            raise ConfigError("data.hub_name", data.get("hub_name"), "a dataset id on the Hugging Face hub")
    if data.source == "jsonl" and data.eval_path is not None and Path(data.eval_path).resolve() == Path(
            data.train_path).resolve():
        raise ConfigError("data.eval_path", data.eval_path, "a file other than data.train_path (held-out rows), or "
                          "null to hold out data.eval_fraction of the training file")
    for key in ("max_train_rows", "max_eval_rows"):
        if data.get(key) is not None:
            _number(f"data.{key}", data[key], low=1, integer=True)
    if data.eval_path is None and data.source == "jsonl":
        _number("data.eval_fraction", data.eval_fraction, low=0, low_open=True, high=1, high_open=True)
    _one_of("objective", cfg.objective, OBJECTIVES)
    check_engine(cfg)  # trainer.engine, and what Unsloth does not take


def check_pretrain(m: DictConfig) -> None:
    """`model.pretrain` (a base pretrained here, qlora_exp.pretrain): null, or every setting in its range."""
    from qlora_exp.pretrain import CORPORA, TOKENIZERS

    p = m.pretrain
    if not isinstance(p, DictConfig):
        raise ConfigError("model.pretrain", p, "null (random weights) or a block of pretraining settings "
                          "(conf/model/tiny_pretrained.yaml)")
    if not m.random_init:
        raise ConfigError("model.random_init", m.random_init, "true with model.pretrain set (a base built and "
                          "pretrained here), or model.pretrain=null for a model loaded from model.name_or_path")
    if m.get("random_build", "full") != "full":
        raise ConfigError("model.random_build", m.random_build, "full with model.pretrain set (it trains the fp32 "
                          "weights it builds)")
    known = ("corpus", "instruct_repeat", "tokenizer", "max_chars", "heldout_every", "seq_len", "batch_size", "steps",
             "lr", "warmup", "weight_decay", "max_grad_norm")
    for key in p:
        if key not in known:
            raise ConfigError(f"model.pretrain.{key}", p[key], f"a key of model.pretrain: {', '.join(known)}")
    _one_of("model.pretrain.corpus", p.get("corpus"), CORPORA)
    _number("model.pretrain.instruct_repeat", p.get("instruct_repeat", 1), low=1, integer=True)
    _one_of("model.pretrain.tokenizer", p.get("tokenizer", "shipped"), TOKENIZERS)
    _number("model.pretrain.max_chars", p.get("max_chars"), low=1000, integer=True)
    _number("model.pretrain.heldout_every", p.get("heldout_every"), low=2, integer=True)
    _number("model.pretrain.seq_len", p.get("seq_len"), low=8, high=m.shape.max_position_embeddings, integer=True)
    _number("model.pretrain.batch_size", p.get("batch_size"), low=1, integer=True)
    _number("model.pretrain.steps", p.get("steps"), low=1, integer=True)
    _number("model.pretrain.lr", p.get("lr"), low=0, low_open=True)
    _number("model.pretrain.warmup", p.get("warmup"), low=0, integer=True)
    _number("model.pretrain.weight_decay", p.get("weight_decay"), low=0)
    _number("model.pretrain.max_grad_norm", p.get("max_grad_norm"), low=0, low_open=True)


def _check_scheduler(opt: DictConfig, max_steps) -> None:
    """What the scheduler needs beyond its name: the final lr of the *_min_lr ones, the decay of warmup_stable_decay,
    an lr above polynomial's end."""
    if opt.get("min_lr_rate") is not None or "min_lr" in opt.scheduler:
        _number("optimizer.min_lr_rate", opt.get("min_lr_rate"), low=0, high=1)
    if opt.get("cooldown") is not None or opt.scheduler == "warmup_stable_decay":
        _number("optimizer.cooldown", opt.get("cooldown"), low=0, low_open=True)
    if opt.scheduler == "polynomial" and isinstance(opt.lr, (int, float)) and opt.lr <= POLYNOMIAL_LR_END:
        raise ConfigError("optimizer.lr", opt.lr, f"a number > {POLYNOMIAL_LR_END} with optimizer.scheduler=polynomial "
                          "(it decays to that lr), or another scheduler")
    if opt.scheduler != "warmup_stable_decay" or not isinstance(max_steps, int):
        return
    if opt.cooldown < 1 and max_steps < 1:
        raise ConfigError("optimizer.cooldown", opt.cooldown, "a number of steps (>= 1) when trainer.max_steps is -1 "
                          "(a fraction of the steps needs trainer.max_steps)")
    if max_steps >= 1:
        warmup = int(opt.warmup) if opt.warmup >= 1 else math.ceil(opt.warmup * max_steps)  # as transformers counts
        if decay_steps(opt.cooldown, max_steps) + warmup > max_steps:
            raise ConfigError("optimizer.cooldown", opt.cooldown, f"at most {max_steps - warmup} steps, or that "
                              f"fraction of trainer.max_steps={max_steps}: warmup ({warmup} steps) and cooldown fit in it")


def decay_steps(cooldown: float, max_steps: int) -> int:
    """`optimizer.cooldown` in steps: < 1 a fraction of the steps, >= 1 a number of steps (as `warmup`)."""
    return int(cooldown) if cooldown >= 1 else max(1, math.ceil(cooldown * max_steps))


def check_model_source(m: DictConfig) -> None:
    """A local model folder: a config.json transformers can read without running the folder's own code, unless
    `model.trust_remote_code=true` asks for that code (auto_map), which must then be in the folder. A hub id is
    left to the hub (nothing is downloaded before the trial)."""
    import json

    name = str(m.name_or_path)
    folder = Path(name).expanduser()
    if not folder.is_dir():
        if name.startswith(("/", "./", "../", "~")) or folder.exists():
            raise ConfigError("model.name_or_path", name, "an existing model folder (holding config.json) or a hub "
                              "id such as meta-llama/Meta-Llama-3-8B")
        return
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError("model.name_or_path", name, "a model folder holding a config.json (transformers' "
                          "save_pretrained writes one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError("model.name_or_path", name, f"a model folder whose config.json is JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError("model.name_or_path", name, "a model folder whose config.json is a JSON object")
    code = {f: sorted(d["auto_map"]) for f, d in (("config.json", config), ("tokenizer_config.json",
            _json_or_empty(folder / "tokenizer_config.json"))) if isinstance(d.get("auto_map"), dict) and d["auto_map"]}
    if code and not m.trust_remote_code:
        names = "; ".join(f"{f}: {', '.join(keys)}" for f, keys in code.items())
        raise ConfigError("model.name_or_path", name, f"a model folder without custom code, or set "
                          f"model.trust_remote_code=true to run its code (its auto_map names code of its own: {names})")
    if code:
        missing = sorted({f"{ref.split('.', 1)[0]}.py" for f in code for ref in _auto_map_refs(folder, f)
                          if "--" not in ref and not (folder / f"{ref.split('.', 1)[0]}.py").is_file()})
        if missing:
            raise ConfigError("model.name_or_path", name, f"a model folder holding the code its auto_map names "
                              f"(missing: {', '.join(missing)})")
        return
    model_type = config.get("model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        import difflib

        import transformers

        near = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING_NAMES), n=3)
        raise ConfigError("model.name_or_path", name, f"a model folder whose config.json model_type is one of the "
                          f"{len(CONFIG_MAPPING_NAMES)} transformers {transformers.__version__} knows "
                          f"({model_type!r} is not{'; nearest: ' + ', '.join(near) if near else ''}), or with "
                          "auto_map naming its own code and model.trust_remote_code=true")


def _json_or_empty(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _auto_map_refs(folder: Path, file: str) -> list[str]:
    """`module.Class` references of an auto_map (a value may be a list: a slow and a fast tokenizer, or null)."""
    refs = []
    for v in _json_or_empty(folder / file).get("auto_map", {}).values():
        refs += [r for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    return refs


def optimizer_for_device(name: str, device: DeviceInfo) -> tuple[str, str | None]:
    """Paged and 8-bit bitsandbytes optimizers need CUDA: fall back to adamw_torch, with a warning."""
    if name in CUDA_ONLY_OPTIMIZERS and not device.cuda:
        return "adamw_torch", (f"optimizer.name={name} needs CUDA; this machine has none, "
                               "so this trial uses adamw_torch (same update, unpaged 32-bit states)")
    return name, None


def check_lengths(cfg: DictConfig, train: list[dict], evals: list[dict], tokenizer=_ABSENT) -> None:
    """`trainer.max_length` against the rows as the trial's tokenizer renders them (qlora_exp.data.check_max_length),
    when that tokenizer can be had with no model built and nothing downloaded (`tokenizer`: one already had, or None
    when it cannot be); else the trial checks, once it has its tokenizer and before it loads its model."""
    from qlora_exp.data import check_max_length

    if tokenizer is _ABSENT:
        tokenizer = trial_tokenizer(cfg)
    if tokenizer is not None:
        check_max_length(cfg.data, cfg.trainer.max_length, tokenizer, train, evals)


def trial_tokenizer(cfg: DictConfig):
    """The trial's tokenizer, or None when only the trial can have it (a hub tokenizer not in the local cache)."""
    from qlora_exp.models import tokenizer_corpus, tokenizer_for_checks

    try:
        return tokenizer_for_checks(cfg.model, cfg.paths.cache_dir, tokenizer_corpus(cfg.paths))
    except Exception as e:  # noqa: BLE001  (not cached, gated, a tokenizer only the trial's environment can load)
        log.debug("max_length check left to the trial: %s", e)
        return None


_ENGINES_SEEN: dict[str, set] = {}  # check_trial's trainer.engine values, per sweep folder
_TRIAL_INPUTS: dict[str, tuple] = {}  # check_trial's rows and tokenizer, per model, data and paths config


def check_trial(cfg: DictConfig) -> None:
    """The single-run checks on one point of a sweep (`hydra.sweeper.check`), run by the sweep driver on each choice
    and grid point, and both ends of each interval, before the first trial starts. Machine-specific checks (bf16,
    fp16) wait for the trial's own machine, as `python -m qlora_exp`'s own check does. With local data, also
    trainer.max_length against the rows (check_lengths; rows and tokenizer read once per model and data)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.set_struct(task, False)
    task.paths.output_dir = str(Path(task.paths.output_root) / "runs" / "check")  # ${hydra:...} has no value yet
    _one_engine_per_worker(cfg, task)
    check_config(task, DeviceInfo(cuda=True, bf16=True, n_gpus=None, name="the trial's machine"))
    if task.data.source == "jsonl":  # max_length against the rows (a sweep over it, or over the data or the model)
        import json

        from qlora_exp.data import load_rows

        key = json.dumps([OmegaConf.to_container(task[k], resolve=True) for k in ("model", "data", "paths")]
                         + [task.trainer.seed], sort_keys=True, default=str)
        if key not in _TRIAL_INPUTS:
            _TRIAL_INPUTS[key] = (*load_rows(task.data, task.trainer.seed), trial_tokenizer(task))
        check_lengths(task, *_TRIAL_INPUTS[key])


def _one_engine_per_worker(cfg: DictConfig, task: DictConfig) -> None:
    """A sweep of both engines runs a process per trial: Unsloth patches transformers' model classes for the whole
    process that imports it, so a sweep worker's hf trials after an Unsloth one would run Unsloth's code."""
    seen = _ENGINES_SEEN.setdefault(str(cfg.hydra.sweep.dir), set())
    seen.add(task.trainer.get("engine", "hf"))
    mode = cfg.hydra.sweeper.get("mode")
    if len(seen) > 1 and mode == "workers":
        raise ConfigError("hydra.sweeper.mode", mode, "processes in a sweep of both engines (trainer.engine="
                          f"{','.join(sorted(seen))}): Unsloth patches transformers' models for the whole process, "
                          "so a worker's hf trials after an Unsloth one would run Unsloth's code")
