"""A trial in phases, as torchtune writes its recipes: one plan resolved once from the config, then build the base,
attach the adapter, train, collect.

    plan = plan_trial(cfg)                        # every decision, once: device, precision, optimizer, split, ...
    base = build_base(cfg, plan, rows)            # tokenizer + quantized, prepared base model (kept warm here)
    model = attach_adapter(base, cfg, plan)       # fresh LoRA adapters, from the trial's seed
    run = train(cfg, plan, base, model, ...)      # trl's SFTTrainer: a fresh optimizer, scheduler, RNG, data order
    collect(run, plan, result)                    # what metrics.json and TensorBoard report
    release(base, model)                          # the adapters taken off: the base as build_base left it

What makes a sweep worker (sweeper.workers) possible: the base is the only thing a trial shares with the next,
kept in this process by `build_base` and given back as it is when the next trial's `plan.base_key` (model,
quantization, precision, kernels, checkpointing) is the same; another key loads the new base and lets the old one
go. The tokenized rows are kept the same way, under `plan.data_key`. Everything a trial trains is made again per
trial from its own seed, so a trial's result does not depend on what ran before it in the process (a test: the same
trial cold and third on a warm worker, the same eval loss).
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qlora_exp import engines, paged
from qlora_exp.builders import build_lora_config, build_quantization_config, build_sft_config, resolve_precision
from qlora_exp.data import load_rows
from qlora_exp.device import DeviceInfo, probe_device
from qlora_exp.distributed import is_rank, rank_split
from qlora_exp.kernels import apply_fused_kernels, resolve_fused_kernels
from qlora_exp.memory import depth_for, plan_memory
from qlora_exp.packing import layout_for
from qlora_exp.validate import check_config, optimizer_for_device, resolve_target_modules

log = logging.getLogger("qlora_exp.trial")


# ---- plan: every decision, resolved once from the config ----------------------------------------------------
@dataclass(frozen=True)
class Plan:
    device: DeviceInfo
    target_modules: tuple[str, ...]
    optimizer: str                  # after any CPU fallback
    precision: str                  # bf16 | fp16 | fp32
    fused: bool
    fused_note: str
    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    checkpointed_layers: int | None  # with checkpointing: the first N decoder layers recompute (None: all)
    offload_checkpoints: bool       # a checkpointed layer's input waits for its backward in CPU memory
    compile_layers: bool            # torch.compile each decoder layer's attention and MLP (regional compilation)
    packing: str                    # off | rows | flat
    memory_note: str | None
    base_key: str                   # what the loaded base depends on: equal keys share one base
    data_key: str                   # what the tokenized rows depend on (with the base's tokenizer)
    notes: tuple[str, ...] = ()
    # the memory plan's token limit per depth (memory.Plan.max_tokens): each micro-batch recomputes only the layers
    # its tokens need, up to checkpointed_layers; None: the same layers every micro-batch
    depth_by_tokens: tuple[int, ...] | None = None
    world_size: int = 1             # processes of the trial (trainer.gpus); micro_batch_size and grad_accum are each one's
    eval_batch_size: int | None = None  # one process's micro-batch: the evaluation's batches are the same on N ranks
    engine: str = "hf"              # trainer.engine as it runs: hf, or unsloth and its version (qlora_exp.engines)

    @property
    def unsloth(self) -> bool:
        return self.engine.startswith("unsloth")

    @property
    def partial_checkpointing(self) -> bool:
        return self.gradient_checkpointing and self.checkpointed_layers is not None


def plan_trial(cfg: DictConfig) -> Plan:
    """Check the config (ConfigError before anything heavy) and resolve every decision a trial makes."""
    # before CUDA's allocator starts: segments that grow in place keep reserved memory close to allocated, which the
    # memory budget's cap (set_per_process_memory_fraction) counts
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = probe_device()
    check_config(cfg, device)
    engine = engines.start(cfg)  # Unsloth, when asked for, imported before the trial imports trl and peft
    unsloth = engine != "hf"
    targets = tuple(resolve_target_modules(cfg))
    optim, fallback = optimizer_for_device(cfg.optimizer.name, device)
    precision = resolve_precision(cfg.trainer.precision, device)
    fused, fused_note = (False, "off: Unsloth's own kernels (trainer.engine=unsloth)") if unsloth else \
        resolve_fused_kernels(cfg.trainer.fused_kernels, cfg.model.architecture, device.cuda)
    tr = cfg.trainer
    offload = tr.get("offload_checkpoints", False)  # auto: where the memory plan finds a faster step with it
    memory = plan_memory(cfg, device, fused, offload)
    offload = memory.offload if memory else offload is True
    micro = memory.micro_batch_size if memory else (tr.get("micro_batch_size") or tr.batch_size)
    accum = memory.grad_accum if memory else tr.batch_size * tr.grad_accum // micro
    ckpt = memory.gradient_checkpointing if memory else bool(tr.gradient_checkpointing)
    layers = memory.checkpointed_layers if memory else tr.get("checkpointed_layers")
    layers = layers if ckpt and not unsloth else None  # Unsloth recomputes every layer or none
    world, eval_batch = int(tr.get("gpus", 1) or 1), micro
    if world > 1:  # each rank 1/N of every step's examples (qlora_exp.distributed)
        micro, accum = rank_split(micro, accum, world)
    packing = layout_for(tr.packing_layout, cfg.model.attn_implementation) if tr.packing and not unsloth else "off"
    base = {"model": _plain(cfg.model), "quantization": _plain(cfg.quantization), "precision": precision,
            "fused": fused, "cuda": device.cuda, "engine": engine,  # checkpointing is set per trial, not kept
            "cache_dir": str(cfg.paths.cache_dir)}
    data = {"data": _plain(cfg.data), "seed": tr.seed, "max_length": tr.max_length,
            "paths": [str(cfg.paths.data_dir), str(cfg.paths.cache_dir)]}
    return Plan(device, targets, optim, precision, fused, fused_note, micro, accum, ckpt, layers, offload and ckpt,
                bool(tr.get("compile_layers", False)), packing, memory.note if memory else None, _key(base), _key(data),
                tuple(n for n in (fallback,) if n), memory.max_tokens if memory and ckpt and not unsloth else None,
                world, eval_batch, engine)


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _key(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


# ---- what a process keeps between trials --------------------------------------------------------------------
@dataclass
class Base:
    key: str
    model: Any                      # the quantized, prepared base (no adapters between trials)
    tokenizer: Any
    source: str                     # the folder or hub id it was loaded from
    quantized: dict | None
    load_s: float                   # how long building it took (0 when it was warm)
    warm: bool = False
    unsloth: bool = False           # loaded by Unsloth: not kept for the next trial (qlora_exp.engines)


@dataclass
class _Warm:
    base: Base | None = None
    rows: dict = field(default_factory=dict)      # data_key -> (train rows, eval rows)
    tokenized: dict = field(default_factory=dict)  # data_key + tokenizer -> (train dataset, eval dataset)
    initial_eval: dict = field(default_factory=dict)  # the base's held-out metrics (reuse_initial_eval's key)
    trials: int = 0


WARM = _Warm()


def forget_warm() -> None:
    """Let the kept base and rows go (after a trial that failed, or ran out of memory): the next trial starts clean."""
    WARM.base, WARM.rows, WARM.tokenized, WARM.initial_eval = None, {}, {}, {}
    gc.unfreeze()  # what keep_out_of_collections froze is collectable again
    _free_memory()
    paged.POOL.give_back()  # the failed trial's paged optimizer states: free for the next (nothing frees them)


def keep_out_of_collections() -> None:
    """After a base is loaded: every object the process holds now (the libraries' modules, the base model, the rows)
    lives as long as the worker, so the garbage collector stops scanning them (`gc.freeze`). A full collection, which
    each trial's end and accelerate's set-up of each trainer run, then looks only at what trials made since:
    0.23 s each on the tiny model on 2 cores before, a few ms after."""
    gc.collect()
    gc.freeze()


def _free_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rows_for(cfg: DictConfig, plan: Plan) -> tuple[list[dict], list[dict]]:
    """The trial's training and held-out rows, read once per process and data config."""
    if plan.data_key not in WARM.rows:
        WARM.rows = {plan.data_key: load_rows(cfg.data, cfg.trainer.seed)}
    return WARM.rows[plan.data_key]


# ---- build base: tokenizer and quantized base model ---------------------------------------------------------
def build_base(cfg: DictConfig, plan: Plan, train_rows: list[dict], eval_rows: list[dict]) -> Base:
    """The base this trial trains on: the one this process holds when its key is the plan's, else loaded (the old
    one let go first). The rows are checked against the tokenizer before any model is loaded."""
    from qlora_exp.models import load_tokenizer, random_model_dir, tokenizer_corpus
    from qlora_exp.validate import check_lengths

    if WARM.base is not None and WARM.base.key == plan.base_key:
        check_lengths(cfg, train_rows, eval_rows, WARM.base.tokenizer)
        WARM.base.warm, WARM.base.load_s = True, 0.0
        return WARM.base
    if WARM.base is not None:
        log.info("this trial's base differs from the one loaded here: loading it again")
        WARM.base, WARM.tokenized, WARM.initial_eval = None, {}, {}
        gc.unfreeze()
        _free_memory()
    start = time.perf_counter()
    m = cfg.model
    source = str(random_model_dir(m, cfg.paths.cache_dir, tokenizer_corpus(cfg.paths), cfg.quantization)
                 ) if m.random_init else m.name_or_path
    tokenizer = load_tokenizer(source, m)
    check_lengths(cfg, train_rows, eval_rows, tokenizer)  # done before the trial when its tokenizer was at hand
    model = _load_model(cfg, plan, source)
    WARM.base = Base(plan.base_key, model, tokenizer, source, quantized_layers(model),
                     round(time.perf_counter() - start, 2), unsloth=plan.unsloth)
    keep_out_of_collections()
    return WARM.base


def _load_model(cfg: DictConfig, plan: Plan, source: str):
    import torch
    from peft import prepare_model_for_kbit_training

    from qlora_exp.models import load_base_model, load_quantized_base, quantized_build, torch_dtype

    device = plan.device
    compute_dtype = torch_dtype(cfg.quantization.compute_dtype, device.bf16)
    quant = build_quantization_config(cfg.quantization, compute_dtype)
    dtype = torch_dtype(cfg.model.dtype, device.bf16) if quant is None else compute_dtype
    device_map = {"": torch.cuda.current_device()} if device.cuda else None
    if plan.unsloth:  # Unsloth's model, kernels and preparation for k-bit training (qlora_exp.engines)
        model = engines.load_unsloth_base(cfg, source, quant, dtype, prequantized=quantized_build(cfg.model))
        model.config.use_cache = False
        keep_trainable_layout(model)
        model.qlora_exp_came_from = f"loaded from {source} by {plan.engine}"
        log.info("base %s", model.qlora_exp_came_from)
        return model
    if quant is not None and quantized_build(cfg.model):  # built in 4 bits: its config.json says how (source's own)
        model, came_from = load_base_model(source, cfg.model, None, dtype, device_map), f"loaded from {source} (built in 4 bits)"
    elif quant is not None and cfg.quantization.get("cache", False) and cfg.quantization.method in ("nf4", "fp4"):
        model, came_from = load_quantized_base(cfg, source, quant, dtype, device_map, keep_trainable_layout)
    else:
        model, came_from = load_base_model(source, cfg.model, quant, dtype, device_map), f"loaded from {source}"
    log.info("base %s", came_from)
    model.config.use_cache = False  # also what lets packed batches keep examples apart (qlora_exp.packing)
    keep_trainable_layout(model)
    model.qlora_exp_came_from = came_from  # the trial's metrics.json says it (base_from)
    if plan.fused:
        apply_fused_kernels(model)
    if quant is not None and cfg.quantization.upcast_frozen:  # the article's: frozen non-quantized weights in fp32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def keep_trainable_layout(model) -> None:
    """bitsandbytes' 4-bit layers, on a CPU with AVX512-BF16, repack their weights for its inference kernel the first
    time they run in eval mode (the evaluation at step 0) and keep that layout: every later training step then goes
    through `gemv_4bit`, which has no backward, so no gradient flows through the frozen base's projections into the
    layers below (torch says so once: "gemv_4bit: an autograd kernel was not registered ... silently incorrect";
    layer 0's lora_B gradient came out 0). Training keeps the layout it can differentiate: the repacking is off."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def set_checkpointing(model, plan: Plan) -> None:
    """This trial's activation recomputation on the base (kept between trials, so set every time): every decoder
    layer, only the first `plan.checkpointed_layers`, or none. With it, the inputs' embeddings require grad (as
    prepare_model_for_kbit_training does), so a frozen base still passes gradients to the recomputed layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not _grads_hooked(model):
            model.enable_input_require_grads()
        layers = [mod for mod in model.modules() if isinstance(mod, GradientCheckpointingLayer)]
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = plan.checkpointed_layers is None or i < plan.checkpointed_layers
            if plan.offload_checkpoints:  # (gradient_checkpointing_enable set torch's own again above)
                layer._gradient_checkpointing_func = offloaded_checkpoint
    else:  # left on by the trial before
        if model.is_gradient_checkpointing:
            model.gradient_checkpointing_disable()
        if _grads_hooked(model):
            model.disable_input_require_grads()


def offloaded_checkpoint(function, *args, **kwargs):
    """torch's activation checkpoint of one layer (non-reentrant), the input it keeps for the backward held in pinned
    CPU memory instead of the GPU's (Unsloth's offloaded checkpointing; torchtune offloads the same way): the
    checkpoint saves that input through the saved-tensor hooks active where it is called, `save_on_cpu`'s, while
    what the layer saves inside is the checkpoint's own (recomputed in the backward, never kept)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def compile_layers(model, on: bool) -> None:
    """torch.compile each decoder layer's attention and MLP, LoRA and 4-bit projections inside (regional
    compilation, as Unsloth compiles each block): inside the layer's checkpoint, so recomputation runs the compiled
    code too. The layers share one compiled graph (torch inlines modules: their weights are the graph's inputs).
    Off: what an earlier trial on this base compiled runs eagerly again."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for layer in (mod for mod in model.modules() if isinstance(mod, GradientCheckpointingLayer)):
        for name in ("self_attn", "mlp"):
            part = getattr(layer, name, None)
            if part is None:
                continue
            if on:
                part.compile(dynamic=True)
            else:
                part._compiled_call_impl = None  # what nn.Module.compile set


def _grads_hooked(model) -> bool:
    """enable_input_require_grads was called (transformers keeps its hooks in one attribute or the other)."""
    return bool(getattr(model, "_require_grads_hooks", None)) or getattr(model, "_require_grads_hook", None) is not None


def quantized_layers(model) -> dict | None:
    """What bitsandbytes put in the loaded model, read from its modules: {"Linear4bit": 28, "quant_type": "nf4",
    "double_quant": true} (4-bit), {"Linear8bitLt": 28} (int8), or None for an unquantized base."""
    import bitsandbytes as bnb

    layers = [mod for mod in model.modules() if isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    if not layers:
        return None
    kinds = sorted({type(mod).__name__ for mod in layers})
    out: dict = {k: sum(type(mod).__name__ == k for mod in layers) for k in kinds}
    states = [mod.weight.quant_state for mod in layers if getattr(mod.weight, "quant_state", None) is not None]
    if states:
        out["quant_type"] = ",".join(sorted({s.quant_type for s in states}))
        out["double_quant"] = all(s.nested for s in states)
        out["quant_state_layers"] = len(states)
    return out


# ---- attach adapter -----------------------------------------------------------------------------------------
def attach_adapter(base: Base, cfg: DictConfig, plan: Plan):
    """Fresh LoRA adapters on the base, initialised from the trial's seed."""
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(cfg.trainer.seed)  # here, not earlier: building a random-weight base model draws from the same RNG
    if plan.unsloth:  # its get_peft_model, its recomputation ("unsloth": offloaded)
        return engines.attach_unsloth_adapter(base.model, cfg, plan.target_modules, engines.unsloth_checkpointing(
            plan.gradient_checkpointing, plan.offload_checkpoints))
    set_checkpointing(base.model, plan)
    with _on_device_of(base.model):
        model = get_peft_model(base.model, build_lora_config(cfg.lora, list(plan.target_modules)))
    compile_layers(model, plan.compile_layers)
    return model


def _on_device_of(model):
    """On a GPU, peft's adapter weights made and initialised there (torch's default-device mode) instead of on the CPU
    and then copied one by one: two small tensors for each of the 8B's 224 projections. On the CPU nothing changes."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    return torch.device(device) if device.type == "cuda" else contextlib.nullcontext()


def release(base: Base, model) -> None:
    """Take the trial's adapters off the base (peft's unload: each LoRA layer back to the layer it wrapped) and let
    the trial's trainer, optimizer and activations go."""
    if base.unsloth:  # Unsloth's patched base is not kept: the next trial loads its own
        WARM.trials += 1
        forget_warm()
        return
    if model is not None and hasattr(model, "unload"):
        inner = model.unload()
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in inner.__dict__:
                delattr(inner, attr)
        base.model = inner
    WARM.trials += 1
    _free_memory()
    paged.POOL.give_back()  # its paged optimizer states: the next trial's (qlora_exp.paged)


# ---- train --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    trainer: Any
    metrics: Any                    # qlora_exp.callbacks.TrialMetrics
    stop_reason: str | None
    setup_s: float                  # train() up to trainer.train(): the SFTTrainer built (data prepared when cold)
    train_rows: int
    train_positions: int
    resumed_from_step: int | None
    initial_eval_reused: bool = False
    largest_micro_batch: int = 0    # token positions of the longest training micro-batch
    depths: list | None = None      # (tokens, layers recomputed) per training micro-batch, with depth_by_tokens
    paged_made: int = 0             # paged optimizer state buffers newly allocated for it (qlora_exp.paged)


def train(cfg: DictConfig, plan: Plan, base: Base, model, out: Path, board, train_rows, eval_rows) -> Run:
    import torch
    from datasets import Dataset
    from hydra.utils import instantiate
    from trl import SFTTrainer

    from qlora_exp import quiet
    from qlora_exp.callbacks import TensorBoardScalars, TrialMetrics, TrialProgress
    from qlora_exp.packing import PackedBatchCollator
    from sweeper.progress import PROGRESS_FILE

    if plan.device.cuda:
        paged.install()  # a paged optimizer's states from the worker's pool, not a new managed allocation per trial
        torch.cuda.reset_peak_memory_stats()  # this trial's peak: the base it trains on, its adapters and steps
        budget = cfg.trainer.get("memory_budget_gb")
        if budget:  # a hard cap: past it the allocator raises out-of-memory instead of taking more
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget * 2**30 / total))
    setup = time.perf_counter()
    paged_before = paged.POOL.allocated
    metrics = TrialMetrics()
    tb = TensorBoardScalars(board.writer, metrics)
    extra = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    tokenized = WARM.tokenized.get((plan.data_key, id(base.tokenizer)))
    args = build_sft_config(cfg, str(out / "checkpoints"), plan.optimizer, plan.precision, use_cpu=not plan.device.cuda,
                            micro_batch_size=plan.micro_batch_size, grad_accum=plan.grad_accum,
                            checkpointing=plan.gradient_checkpointing and not (plan.partial_checkpointing or plan.offload_checkpoints
                                                                                or plan.depth_by_tokens or plan.unsloth),
                            # (the Trainer would set torch's checkpoint on every layer again)
                            prepared=tokenized is not None, eval_batch_size=plan.eval_batch_size,
                            world_size=plan.world_size)
    collator = None
    if plan.packing != "off":
        collator = PackedBatchCollator(pad_token_id=base.tokenizer.pad_token_id, max_length=cfg.trainer.max_length,
                                       layout=plan.packing)
    trainer = SFTTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=tokenized[0] if tokenized else Dataset.from_list(train_rows),
        eval_dataset=tokenized[1] if tokenized else Dataset.from_list(eval_rows),
        processing_class=base.tokenizer,
        callbacks=[metrics, tb, *extra],
    )
    if not quiet.verbose():  # the Trainer's own printer (a dict per log, its bars) gives way to the trial's lines
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        first = is_rank(0)  # the other ranks of a multi-process trial show and write nothing
        trainer.add_callback(TrialProgress(first and quiet.bar_wanted(), out / PROGRESS_FILE if first else None,
                                           quiet.trial_label(), lines=first))
    WARM.tokenized = {(plan.data_key, id(base.tokenizer)): (trainer.train_dataset, trainer.eval_dataset)}
    counts = {"rows": 0, "positions": 0, "largest": 0}

    def count(module, args, kwargs):  # the rows and token positions fed to the model while it trains (not in eval)
        ids = _fed_ids(module, args, kwargs)
        if ids is not None:
            counts["rows"] += int(ids.shape[0])
            counts["positions"] += int(ids.numel())
            counts["largest"] = max(counts["largest"], int(ids.numel()))

    fed = trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    depth = recompute_by_tokens(trainer.model, plan.depth_by_tokens) if plan.depth_by_tokens else None
    reused = reuse_initial_eval(trainer, plan, cfg)
    last = _last_checkpoint(out / "checkpoints")
    setup_s = round(time.perf_counter() - setup, 3)
    try:
        trainer.train(resume_from_checkpoint=last)
        stop_reason = next((c.stop_reason for c in extra if getattr(c, "stop_reason", None)), None)
        if stop_reason is None and (not metrics.eval_history or metrics.eval_history[-1][0] != trainer.state.global_step):
            trainer.evaluate()
    finally:
        trainer.__dict__.pop("evaluate", None)  # the wrapper's closure holds the trainer: no cycle outlives the trial
        tb.close()
        fed.remove()
        if depth:
            depth.remove()
        drop_empty_checkpoints(out / "checkpoints")
    return Run(trainer, metrics, stop_reason, setup_s, counts["rows"], counts["positions"],
               int(last.rsplit("-", 1)[-1]) if last else None, bool(reused), counts["largest"],
               depth.seen if depth else None, paged.POOL.allocated - paged_before)


def drop_empty_checkpoints(folder: Path) -> None:
    """The Trainer's output_dir, made even when no checkpoint is saved, removed when empty: by rank 0 alone, and a
    folder gone or filled meanwhile is left as it is (the ranks of a multi-process trial share it: two removing it
    at once failed the second)."""
    if is_rank(0) and folder.is_dir() and not any(folder.iterdir()):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _fed_ids(module, args, kwargs):
    """The input ids a forward pre-hook sees while the model trains (None in evaluation)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids if module.training else None


class recompute_by_tokens:
    """Each training micro-batch recomputes the first `depth_for(its tokens)` decoder layers, no more: set on the
    layers (their `gradient_checkpointing`, which GradientCheckpointingLayer reads as it is called) from a hook before
    the model's forward. Recomputation changes memory and time, never the result. `seen`: (tokens, depth) per
    micro-batch."""

    def __init__(self, model, table: tuple[int, ...]):
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.layers = [mod for mod in model.modules() if isinstance(mod, GradientCheckpointingLayer)]
        self.table, self.seen = table, []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = _fed_ids(module, args, kwargs)
        if ids is None:
            return
        n = depth_for(int(ids.numel()), self.table)
        for i, layer in enumerate(self.layers):
            layer.gradient_checkpointing = i < n
        self.seen.append((int(ids.numel()), n))

    def remove(self) -> None:
        self.handle.remove()


def reuse_initial_eval(trainer, plan: Plan, cfg: DictConfig) -> dict:
    """The evaluation at step 0, measured once per base: fresh LoRA adapters add exactly zero (lora_B starts at
    zero), so before the first step every trial on this base, rows and evaluation batches gets the base's own
    held-out loss, bit for bit. The first trial measures it; a later trial on a warm worker logs and reports the
    same metrics (to its callbacks, TensorBoard and the pruner) without its forward passes. The returned dict is
    non-empty once this trial reused them."""
    key = _key({"base": plan.base_key, "data": plan.data_key, "micro": plan.micro_batch_size, "packing": plan.packing,
                "max_length": cfg.trainer.max_length})
    evaluate, reused = trainer.evaluate, {}

    def at_step_0_once(*args, **kwargs):
        if trainer.state.global_step != 0 or args or kwargs.get("eval_dataset") is not None:
            return evaluate(*args, **kwargs)
        if key not in WARM.initial_eval:
            metrics = evaluate(*args, **kwargs)
            WARM.initial_eval = {key: dict(metrics)}
            return metrics
        metrics = dict(WARM.initial_eval[key])
        reused.update(metrics)
        # what the evaluation draws from the RNGs besides its forward passes: its data loader's iterator takes a
        # seed from torch's generator when it starts (so the trial's dropout masks after it are the cold run's)
        batches = iter(trainer.get_eval_dataloader())
        next(batches, None)
        del batches
        trainer.log(metrics)  # what Trainer.evaluate does with its metrics
        trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
        return metrics

    trainer.evaluate = at_step_0_once
    return reused


def _last_checkpoint(folder: Path) -> str | None:
    """Resume from the newest complete Trainer checkpoint of this trial folder (after preemption). The Trainer writes
    `trainer_state.json` last: a checkpoint without it (or with it torn) was cut short mid-save by the very signal
    that requeued the trial (SLURM's SIGUSR2, a kill), so the one before it is taken."""
    import re

    if not folder.is_dir():
        return None
    steps = sorted((int(m.group(1)), path) for path in folder.iterdir()
                   if path.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", path.name)))
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.info("skipping %s: cut short while it was saved (no complete trainer_state.json)", path)
            continue
        log.info("resuming from %s", path)
        return str(path)
    return None


# ---- collect ------------------------------------------------------------------------------------------------
def collect(cfg: DictConfig, plan: Plan, base: Base, model, run: Run, out: Path, result) -> None:
    """Save the adapter and fill `result` (a qlora_exp.trial.TrialResult) from the finished run."""
    import math

    import torch

    from qlora_exp.callbacks import peak_memory_gb

    if cfg.trainer.save_adapter and is_rank(0):
        # the adapter's own tensors only: peft would read the whole model's state_dict, and bitsandbytes' 4-bit
        # layers write theirs by changing their quantization state in place (bitsandbytes 0.50: the next trial on
        # this base then evaluated 2e-4 off its cold run)
        trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        run.trainer.model.save_pretrained(out / "adapter", safe_serialization=True, state_dict=trained)
        base.tokenizer.save_pretrained(out / "adapter")
    state, metrics = run.trainer.state, run.metrics
    result.status = run.stop_reason or "complete"
    result.trainable_params, result.total_params = (int(n) for n in model.get_nb_trainable_parameters())
    result.eval_history = [list(x) for x in metrics.eval_history]
    result.initial_eval_loss = metrics.eval_history[0][1] if metrics.eval_history else None
    result.eval_loss = metrics.eval_history[-1][1] if metrics.eval_history else None
    result.perplexity = math.exp(min(result.eval_loss, 50)) if result.eval_loss is not None else None
    result.train_tokens = int(state.num_input_tokens_seen)
    result.train_tokens_per_s = round(metrics.tokens_per_s(state), 1)
    steady = metrics.steady_tokens_per_s()
    result.steady_tokens_per_s = round(steady, 1) if steady else None
    result.loss_history = [list(x) for x in metrics.loss_history]
    result.train_time_s = round(metrics.train_time, 2)
    result.step_s = [round(seconds, 3) for seconds, _ in metrics.steps]
    result.train_loop_s = round(metrics.loop_time, 2)
    result.ready_at, result.first_step_at = metrics.ready_at, metrics.first_step_at
    result.phase_s["trainer"] = run.setup_s
    result.steps = state.global_step
    result.train_rows, result.train_positions = run.train_rows, run.train_positions
    result.resumed_from_step = run.resumed_from_step
    result.initial_eval_reused = run.initial_eval_reused
    if paged.POOL.in_use:
        result.paged_states = {"buffers": len(paged.POOL.in_use), "new": run.paged_made,
                               "held_gb": round(paged.POOL.held_bytes() / 2**30, 3)}
    result.largest_micro_batch_tokens = run.largest_micro_batch
    if run.depths:
        n = [d for _, d in run.depths]
        result.recomputed_layers = {"min": min(n), "mean": round(sum(n) / len(n), 2), "max": max(n),
                                    "micro_batches": len(n)}
    gb, kind = peak_memory_gb()
    result.peak_memory_gb, result.peak_memory_kind = round(gb, 3), kind
    if plan.device.cuda:
        result.peak_memory_reserved_gb = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    result.objective = getattr(result, cfg.objective)


def note_plan(plan: Plan) -> None:
    for note in plan.notes:  # one log line each (a UserWarning as well printed it twice)
        log.warning(note)
    for note in (f"engine: {plan.engine}" if plan.unsloth else None, f"fused kernels: {plan.fused_note}",
                 plan.memory_note):
        if note:
            log.info(note)
