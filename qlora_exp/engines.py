"""`trainer.engine`: what loads the quantized base and attaches the LoRA adapters.

    hf       transformers + bitsandbytes + peft, with this project's kernels, packing and memory plan (the default)
    unsloth  Unsloth's FastLanguageModel: its patched model, LoRA kernels, checkpointing and batching,
             for users who already train with it (axolotl and LLaMA-Factory offer the same switch)

    python -m qlora_exp trainer.engine=unsloth           # pip install 'qlora_exp[unsloth]', on a CUDA GPU machine

With Unsloth the trial is still this project's: the same config, checks, data, trl SFTTrainer, optimizer, schedule,
TensorBoard run, metrics.json and sweep. Unsloth decides what it decides for its own users: its kernels (Liger's are
not applied), its checkpointing (every layer: `"unsloth"`, which offloads, where the memory plan offloads; `True`
otherwise), its own batching (padding-free where it picks it; this project's packing is off). A warm sweep worker
does not keep an Unsloth base between trials (Unsloth patches the model it gives out, and unloading its adapters is
not part of its API): each trial loads it again.
"""
from __future__ import annotations

import importlib.util
import logging

from omegaconf import DictConfig

from qlora_exp.errors import ConfigError

log = logging.getLogger("qlora_exp.trial")
ENGINES = ("hf", "unsloth")
UNSLOTH_QUANTIZATION = ("nf4", "fp4", "none")
INSTALL = "pip install 'qlora_exp[unsloth]' (a CUDA GPU machine)"


def engine_of(cfg: DictConfig) -> str:
    return cfg.trainer.get("engine", "hf")


def check_engine(cfg: DictConfig) -> None:
    """`trainer.engine` and what Unsloth cannot take, as one line each, before anything is loaded."""
    engine = engine_of(cfg)
    if engine not in ENGINES:
        raise ConfigError("trainer.engine", engine, "one of " + ", ".join(ENGINES))
    if engine != "unsloth":
        return
    tr, q = cfg.trainer, cfg.quantization
    if q.method not in UNSLOTH_QUANTIZATION:
        raise ConfigError("quantization.method", q.method, f"{', '.join(UNSLOTH_QUANTIZATION)} with trainer.engine="
                          "unsloth (Unsloth trains 4-bit or 16-bit bases), or trainer.engine=hf")
    refused = [("trainer.compile_layers", tr.get("compile_layers", False), (False,), "false (Unsloth compiles its own)"),
               ("trainer.checkpointed_layers", tr.get("checkpointed_layers"), (None,),
                "null (Unsloth recomputes every layer or none)"),
               ("trainer.gpus", tr.get("gpus", 1), (1,), "1 (one process per trial)"),
               ("trainer.fused_kernels", tr.fused_kernels, ("auto", False), "auto or false (Unsloth's kernels, not Liger's)"),
               ("quantization.cache", q.get("cache", False), (False,), "false (Unsloth quantizes as it loads)")]
    for key, value, accepted, say in refused:  # (their types were checked before: check_config)
        if value not in accepted:
            raise ConfigError(key, value, f"{say} with trainer.engine=unsloth, or trainer.engine=hf")
    if importlib.util.find_spec("unsloth") is None:
        raise ConfigError("trainer.engine", "unsloth", f"hf: Unsloth is not installed here ({INSTALL})")


def start(cfg: DictConfig) -> str:
    """Import Unsloth (before the trial imports trl and peft: it patches them) and say which engine runs, for the log
    and metrics.json; a machine where it cannot start is one line."""
    if engine_of(cfg) != "unsloth":
        _check_trl_for_hf()
        return "hf"
    try:
        import unsloth
    except Exception as e:  # noqa: BLE001  (Unsloth raises NotImplementedError, RuntimeError... with no GPU)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError("trainer.engine", "unsloth", f"hf here: Unsloth did not start ({type(e).__name__}: "
                          f"{first[:200]})") from None
    return f"unsloth {getattr(unsloth, '__version__', '?')}"


def _check_trl_for_hf() -> None:
    """trl 1.15 (the newest Unsloth 2026.10 allows: the unsloth extra) gives every SFTTrainer a fused LM head that
    calls its Triton kernel even where Triton is absent (a CPU-only torch): the hf engine's first step would fail."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("trl").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return
    if (major, minor) < (1, 16) and importlib.util.find_spec("triton") is None:
        raise ConfigError("trainer.engine", "hf", f"unsloth here, or trl >= 1.16 (pip install 'trl>=1.16'): trl "
                          f"{version('trl')}'s SFTTrainer needs Triton, which this machine does not have")


def unsloth_checkpointing(gradient_checkpointing: bool, offload: bool):
    """The plan's recomputation as Unsloth's `use_gradient_checkpointing`: "unsloth" is its offloaded one."""
    if not gradient_checkpointing:
        return False
    return "unsloth" if offload else True


def load_unsloth_base(cfg: DictConfig, source: str, quant, dtype, prequantized: bool):
    """The base through Unsloth's FastLanguageModel, the trial's BitsAndBytesConfig passed as it is (Unsloth keeps a
    caller's 4-bit config; None: a 16-bit base; a base built in 4 bits brings its own). Safetensors only, no remote
    code unless the config asks. Its tokenizer is not used: the trial's, which the checks read, is."""
    from unsloth import FastLanguageModel

    m = cfg.model
    kwargs = {"quantization_config": quant} if quant is not None and not prequantized else {}
    model, _ = FastLanguageModel.from_pretrained(
        model_name=source, max_seq_length=cfg.trainer.max_length, dtype=dtype, load_in_4bit=quant is not None,
        load_in_16bit=quant is None, trust_remote_code=m.trust_remote_code, revision=m.revision,
        local_files_only=bool(m.random_init), fix_tokenizer=False, use_safetensors=True, **kwargs)
    return model


def attach_unsloth_adapter(model, cfg: DictConfig, targets, checkpointing):
    """Fresh LoRA adapters through Unsloth's get_peft_model, from the trial's seed."""
    from unsloth import FastLanguageModel

    lora = cfg.lora
    return FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
        target_modules=list(targets), use_rslora=lora.use_rslora, use_gradient_checkpointing=checkpointing,
        random_state=cfg.trainer.seed, max_seq_length=cfg.trainer.max_length)
