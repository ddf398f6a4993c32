"""Check a composed config before any model or dataset is loaded.

Every check raises `ConfigError(key, value, accepted)`: one line naming the key, the value and what
would be accepted. `check_config` is pure apart from looking at the file system for data paths.
"""
import math
from pathlib import Path

from omegaconf import DictConfig

from qlora_exp.device import DeviceInfo
from qlora_exp.errors import ConfigError
from qlora_exp.packing import LAYOUTS

DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANT_METHODS = ("nf4", "fp4", "int8", "none")
QUANT_STORAGE = ("uint8", "float16", "bfloat16", "float32")
LORA_BIAS = ("none", "all", "lora_only")
TARGET_PRESETS = ("all_linear", "attention", "mlp")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DATA_SOURCES = ("jsonl", "hub")
OBJECTIVES = ("eval_loss", "perplexity", "train_tokens_per_s", "peak_memory_gb", "wall_time_s")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")
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
    if not m.random_init and not m.name_or_path:
        raise ConfigError("model.name_or_path", m.name_or_path, "a hub id or local path, or model.random_init=true")
    _one_of("model.dtype", m.dtype, DTYPES)
    if not isinstance(m.trust_remote_code, bool):
        raise ConfigError("model.trust_remote_code", m.trust_remote_code, "true or false")
    # quantization
    _one_of("quantization.method", q.method, QUANT_METHODS)
    _one_of("quantization.compute_dtype", q.compute_dtype, DTYPES)
    _one_of("quantization.upcast_frozen", q.get("upcast_frozen", False), (True, False))
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
    _one_of("trainer.packing", tr.packing, (True, False))
    _one_of("trainer.packing_layout", tr.packing_layout, ("auto", *LAYOUTS))
    _one_of("trainer.fused_kernels", tr.fused_kernels, (True, False, "auto"))
    _number("trainer.max_steps", tr.max_steps, low=-1, integer=True)
    if tr.max_steps == 0:
        raise ConfigError("trainer.max_steps", 0, "an integer >= 1, or -1 to train for trainer.epochs")
    _number("trainer.epochs", tr.epochs, low=0, low_open=True)
    _number("trainer.max_length", tr.max_length, low=8, integer=True)
    _number("trainer.eval_every", tr.eval_every, low=1, integer=True)
    _number("trainer.seed", tr.seed, low=0, high=2**32 - 1, integer=True)  # numpy's seed range
    if tr.get("num_workers") is not None:
        _number("trainer.num_workers", tr.num_workers, low=0, integer=True)
    _number("trainer.log_every", tr.log_every, low=1, integer=True)
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


def optimizer_for_device(name: str, device: DeviceInfo) -> tuple[str, str | None]:
    """Paged and 8-bit bitsandbytes optimizers need CUDA: fall back to adamw_torch, with a warning."""
    if name in CUDA_ONLY_OPTIMIZERS and not device.cuda:
        return "adamw_torch", (f"optimizer.name={name} needs CUDA; this machine has none, "
                               "so this trial uses adamw_torch (same update, unpaged 32-bit states)")
    return name, None


def check_trial(cfg: DictConfig) -> None:
    """The single-run checks on one point of a sweep (`hydra.sweeper.check`), run by the sweep driver on each choice
    and grid point, and both ends of each interval, before the first trial starts. Machine-specific checks (bf16,
    fp16) wait for the trial's own machine, as `python -m qlora_exp`'s own check does."""
    from pathlib import Path

    from omegaconf import OmegaConf

    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.set_struct(task, False)
    task.paths.output_dir = str(Path(task.paths.output_root) / "runs" / "check")  # ${hydra:...} has no value yet
    check_config(task, DeviceInfo(cuda=True, bf16=True, n_gpus=1, name="the trial's machine"))
